"""The shared layer of the data jobs (`data_gen.job_common`): the backend's fingerprint, the worker base, the backend
lifetime and checks of `run_backend_job`, and `job_main`."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field

import pytest

from data_gen.backends.base import GenerationResult, RolloutBackend
from data_gen.job_common import (BackendArguments, BackendWorker, JobArguments, SamplingArguments, job_main,
                                 run_backend_job)
from rlhf.jobs.runner import Failure, JobInputError, JobSummary


def test_backend_fingerprint_keeps_what_shapes_records():
    # the policy under the backend's own parameter name; batch_size, device and max_concurrency only say how it runs
    args = BackendArguments(backend="hf", model="ckpt", backend_kwargs={"batch_size": 16, "device": "cpu",
                                                                        "max_patches": 1})
    assert args.fingerprint() == {"backend": "hf", "model_name_or_path": "ckpt", "max_patches": 1}
    served = BackendArguments(backend="openai", model="m", backend_kwargs='{"base_url": "u", "max_concurrency": 8}')
    assert served.fingerprint() == {"backend": "openai", "base_url": "u", "model": "m"}


class Echo(RolloutBackend):
    """Answers request `id` with `id!`; counts its calls and whether it was closed."""

    def __init__(self):
        self.calls, self.closed = 0, False

    def generate(self, requests):
        self.calls += 1
        return [GenerationResult(id=r, texts=[f"{r}!"], num_generated_tokens=1) for r in requests]

    def close(self):
        self.closed = True


@dataclass
class Maker:
    """Stands in for BackendArguments: `make` hands out new Echo backends and remembers them."""

    made: list = field(default_factory=list)

    def make(self, continuation: bool = False):
        self.made.append((Echo(), continuation))
        return self.made[-1][0]


@dataclass
class Settings:
    backend: Maker = field(default_factory=Maker)


@dataclass
class Item:
    id: str
    kind: str = "ok"  # ok, unreadable (prepare raises), empty (prepare gives a Failure)


class EchoWorker(BackendWorker):
    continuation = True

    def prepare(self, item: Item):
        if item.kind == "unreadable":
            raise ValueError(f"image of {item.id} is outside the image root")
        if item.kind == "empty":
            return Failure(item.id, "nothing to do")
        return item.id

    def complete(self, items, work):
        results = self.open_backend().generate(work)
        return [{"id": item.id, "text": result.texts[0]} for item, result in zip(items, results)]


def test_worker_prepares_each_item_and_completes_the_rest_in_one_pass():
    worker = EchoWorker(Settings())
    out = worker([Item("a"), Item("b", "unreadable"), Item("c", "empty"), Item("d")])
    assert out == [{"id": "a", "text": "a!"}, Failure("b", "image of b is outside the image root"),
                   Failure("c", "nothing to do"), {"id": "d", "text": "d!"}]
    (backend, continuation), = worker.settings.backend.made  # built on first use, with the worker's continuation
    assert continuation and backend.calls == 1  # a and d in one generate call
    assert worker([Item("e", "empty")]) == [Failure("e", "nothing to do")] and backend.calls == 1  # nothing asked
    copy = pickle.loads(pickle.dumps(worker))  # a worker process gets the settings, builds its own backend
    assert copy.backend is None and isinstance(copy.settings, Settings)


def job(tmp_path, **kwargs) -> JobArguments:
    return JobArguments(output_dir=str(tmp_path / "out"), progress=False, **kwargs)


def test_run_backend_job_builds_checks_and_closes_its_backend(tmp_path):
    items = [Item("a"), Item("b", "unreadable")]
    worker = EchoWorker(Settings())
    summary = run_backend_job(items, worker, job(tmp_path), name="echo", desc="echo", settings_file="s.json",
                              fingerprint={"k": 1})
    assert (summary.total, summary.succeeded, summary.failed) == (2, 1, 1)
    (backend, continuation), = worker.settings.backend.made  # built up front in the driver, closed at the end
    assert continuation and backend.calls == 1 and backend.closed
    assert json.loads((tmp_path / "out" / "s.json").read_text()) == {"k": 1}
    assert [json.loads(line)["id"] for line in (tmp_path / "out" / "echo.jsonl").read_text().splitlines()] == ["a"]


def test_run_backend_job_leaves_a_handed_in_backend_open(tmp_path):
    mine = Echo()
    worker = EchoWorker(Settings(), mine)
    run_backend_job([Item("a")], worker, job(tmp_path), name="echo", desc="echo", settings_file="s.json",
                    fingerprint={})
    assert mine.calls == 1 and not mine.closed and worker.settings.backend.made == []


def test_run_backend_job_checks_the_backend_for_worker_processes(tmp_path, monkeypatch):
    """workers > 1: the driver builds the backend once (a policy that cannot be used stops the job at start) and
    closes it again before the worker processes, each building its own, start; needs_backend False skips that."""
    import rlhf.jobs.runner as runner

    seen = []
    monkeypatch.setattr(runner, "run_job", lambda items, worker, *a, **k: seen.append(worker.backend) or "ran")
    worker = EchoWorker(Settings())
    assert run_backend_job([Item("a")], worker, job(tmp_path, workers=2), name="echo", desc="echo",
                           settings_file="s.json", fingerprint={}) == "ran"
    (backend, _), = worker.settings.backend.made
    assert backend.closed and seen == [None]
    idle = EchoWorker(Settings())
    run_backend_job([Item("a")], idle, job(tmp_path / "2"), name="echo", desc="echo", settings_file="s.json",
                    fingerprint={}, needs_backend=False)
    assert idle.settings.backend.made == [] and seen == [None, None]


def test_run_backend_job_refuses_other_settings_and_changed_items(tmp_path):
    def run(fingerprint, text):
        worker = EchoWorker(Settings())
        changed = ({"a": {"text": text}}, lambda record, _: {"text": record["text"][:-1]})
        return run_backend_job([Item("a")], worker, job(tmp_path), name="echo", desc="echo", settings_file="s.json",
                               fingerprint=fingerprint, changed=changed)

    assert run({"k": 1}, "a").succeeded == 1
    with pytest.raises(JobInputError, match=r"s\.json: this folder holds records made with other settings \(k\)"):
        run({"k": 2}, "a")
    with pytest.raises(JobInputError, match=r"echo\.jsonl: id 'a': the input item changed since its record was "
                                            r"made \(text; 1 changed item\(s\) in all\)"):
        run({"k": 1}, "b")
    assert run({"k": 1}, "a").skipped_done == 1


@dataclass
class ToyArguments:
    rounds: int = field(default=1, metadata={"help": "How many rounds."})


def test_job_main_prints_the_report_and_exits_by_failure_rate(tmp_path, capsys):
    def run(args, backend_args, sampling, job):
        assert (args.rounds, backend_args.backend, sampling.seed) == (3, "hf", 5)
        failed = args.rounds - 2  # 1 of 4 items
        return JobSummary(total=4, skipped_done=0, processed=4, succeeded=4 - failed, failed=failed, seconds=1.0,
                          name="toy")

    def report(summary, job):
        return summary, [f"{summary.succeeded} done in {job.output_dir}"]

    argv = ["--rounds", "3", "--seed", "5", "--output_dir", str(tmp_path)]
    assert job_main(argv, "mmalign toy", ToyArguments, SamplingArguments, run, report) == 0
    assert capsys.readouterr().out == f"3 done in {tmp_path}\n"
    # 1 of 4 failed: more than max_failure_rate 0.2, exit status 1 and one line on stderr
    assert job_main([*argv, "--max_failure_rate", "0.2"], "mmalign toy", ToyArguments, SamplingArguments, run,
                    report) == 1
    captured = capsys.readouterr()
    assert captured.out == f"3 done in {tmp_path}\n"
    assert captured.err.startswith("toy: 1 of 4 items failed this run (more than max_failure_rate 0.2)")
