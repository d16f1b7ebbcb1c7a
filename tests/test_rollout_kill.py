"""SIGKILL the real rollout job at seeded random moments, resume each time: the final rollouts equal those of an
uninterrupted run exactly (nothing lost, nothing duplicated, the same samples)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_gen.job_common import BackendArguments, JobArguments, SamplingArguments
from data_gen.rollout import RolloutArguments, run

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "recipes" / "data" / "tiny_questions"
N_QUESTIONS, KILLS = 12, 3
MAX_NEW_TOKENS = 48  # long enough that a question takes a few tenths of a second: the kills land mid-job
BACKEND_KWARGS = {"device": "cpu", "max_patches": 1, "batch_size": 2}  # one question's 2 samples per batch


def committed(path: Path) -> int:
    """Complete lines in the job's result files (the merged file; a kill may leave a torn last line)."""
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def command(questions: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "rollout", "--questions", str(questions), "--output_dir", str(out),
            "--model", "tiny-internvl", "--backend_kwargs", json.dumps(BACKEND_KWARGS), "--num_samples", "2",
            "--max_new_tokens", str(MAX_NEW_TOKENS), "--seed", "5", "--batch_size", "1", "--progress", "false"]


@pytest.mark.slow
def test_killed_and_resumed_rollout_equals_an_uninterrupted_run(tmp_path):
    shutil.copytree(QUESTIONS / "images", tmp_path / "q" / "images")
    lines = (QUESTIONS / "train.jsonl").read_text().splitlines()[:N_QUESTIONS]
    questions = tmp_path / "q" / "train.jsonl"
    questions.write_text("\n".join(lines) + "\n")

    # the reference: one uninterrupted run, in this process
    reference = tmp_path / "reference"
    run(RolloutArguments(questions=str(questions), num_samples=2),
        BackendArguments(model="tiny-internvl", backend_kwargs=dict(BACKEND_KWARGS)),
        SamplingArguments(max_new_tokens=MAX_NEW_TOKENS, seed=5), JobArguments(output_dir=str(reference), batch_size=1,
                                                                  progress=False))

    out = tmp_path / "killed"
    results = out / "rollouts.jsonl"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    rng = random.Random(20240607)
    seen = []
    for _ in range(KILLS):
        before = committed(results)
        target = min(N_QUESTIONS - 1, before + rng.randint(1, 3))  # kill once this many are done, then a bit later
        proc = subprocess.Popen(command(questions, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while committed(results) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside the next question (or its write)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        seen.append(committed(results))
    assert seen == sorted(seen) and 0 < seen[-1] < N_QUESTIONS, seen  # every kill landed mid-job

    final = subprocess.run(command(questions, out), cwd=REPO, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert results.read_bytes() == (reference / "rollouts.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert ids == [json.loads(line)["id"] for line in lines]  # each question once, in input order
    assert (out / "failures.jsonl").read_text() == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_done"] == seen[-1] and summary["processed"] == N_QUESTIONS - seen[-1]
