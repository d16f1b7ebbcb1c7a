"""Preference records for MPO: read MMPR folders and TRL preference data sets, validate them.

The flow before training (each step reports every bad record at once, never only the first):

    records = read_mmpr("data/meta.json")                   # mmpr; or trl_format.read_preference_dataset(...)
    problems = validate_records(records)                    # validate: fields, placeholders, images, paths
    records = split_valid(records, problems, skip_invalid=False, rejects_path=None)   # raise, or skip + log
    rows = build_rows(records, processor, max_length=8192, on_overflow="skip")        # rlhf.collator

`build_rows` tokenizes the records and fits the token rows to max_length (`rlhf.collator.check_lengths`).

- `records`: `PreferenceRecord`, `RecordProblem` (one line `file:line: field: message`), `DataValidationError`;
- `mmpr`: `read_mmpr`, the MMPR reader (`meta.json` and annotation JSON lines, InternVL's rules);
- `trl_format`: `read_preference_dataset`, the reader of TRL's preference format (a Dataset or a file);
- `jsonl`: the JSON-lines reading both readers share (a bad line becomes a read issue, never a stop);
- `validate`: `validate_records`, `split_valid`, `write_rejects`;
- `images`: the image confinement rule (`resolve_image`), the readability check (`image_problem`), `load_image`.

Reading never stops at a bad line: a malformed JSON line, a missing field or a wrong type becomes a record that
carries its read issues, which `validate_records` reports with everything else (reference section 2 has the MMPR
format).
"""
