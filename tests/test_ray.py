"""executor=ray: the same records as the local executor (rollout, label-steps, bon), a killed worker's items run
elsewhere exactly once, a SIGKILLed driver resumes. One local Ray for the module (2 CPUs, no dashboard, a small
object store), two actors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.jobs.runner import Failure, JobInputError, run_job

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "recipes" / "data" / "tiny_questions"
RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 80 * 2**20, "log_to_driver": False}


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(**RAY_INIT, runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def lines_by_id(path: Path) -> list[str]:
    """The file's lines sorted by the id they carry."""
    return sorted(path.read_text().splitlines(), key=lambda line: str(json.loads(line)["id"]))


# -- the same records as the local executor, on the tiny model -------------------------------------------------------

@pytest.fixture
def one_torch_thread():
    """The local runs with 1 torch thread, as each Ray worker has (1 CPU): faster on 2 shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ray_rollout_and_label_steps_equal_the_local_executor_byte_for_byte(tmp_path, ray_session, one_torch_thread):
    from data_gen import label_steps, rollout
    from data_gen.job_common import BackendArguments, JobArguments, SamplingArguments

    questions = tmp_path / "train.jsonl"  # 6 questions with images
    questions.write_text("\n".join((QUESTIONS / "train.jsonl").read_text().splitlines()[:6]) + "\n")
    backend = {"device": "cpu", "max_patches": 1}

    def args(out, executor, **kw):
        return (BackendArguments(model="tiny-internvl", backend_kwargs=dict(backend)),
                SamplingArguments(max_new_tokens=8, seed=3),
                JobArguments(output_dir=str(out), batch_size=2, progress=False, executor=executor,
                             workers=2 if executor == "ray" else 1, **kw))

    for executor in ("local", "ray"):
        summary = rollout.run(rollout.RolloutArguments(questions=str(questions), image_root=str(QUESTIONS),
                                                         num_samples=2),
                              *args(tmp_path / executor / "rollout", executor))
        assert (summary.succeeded, summary.failed) == (6, 0)
        # label 1 response per question with 2 continuations a step; both read the local rollouts
        steps = label_steps.LabelStepsArguments(solutions=str(tmp_path / "local" / "rollout" / "rollouts.jsonl"),
                                                solutions_per_question=1, num_continuations=2, max_steps_per_solution=3)
        summary, _ = label_steps.run(steps, *args(tmp_path / executor / "labels", executor))
        assert (summary.succeeded, summary.failed) == (6, 0)
    local, ray = tmp_path / "local", tmp_path / "ray"
    for name in ("rollout/rollouts.jsonl", "labels/mc.jsonl", "labels/visualprm.jsonl"):
        assert lines_by_id(ray / name) == lines_by_id(local / name), name
    # the merged files are even in input order, so equal as they are
    assert (ray / "rollout/rollouts.jsonl").read_bytes() == (local / "rollout/rollouts.jsonl").read_bytes()
    records = [json.loads(line) for line in (local / "rollout/rollouts.jsonl").read_text().splitlines()]
    assert sum(r["num_generated_tokens"] for r in records) > 0


def test_ray_bon_equals_the_local_executor_byte_for_byte(tmp_path, ray_session, one_torch_thread):
    """`mmalign bon --executor ray --workers 2` on the tiny PRM: each actor loads its own scorer; scores.jsonl and
    the Best-of-N outputs are the local run's."""
    from rlhf.cli import main
    from tests.test_bon import _config, _write_questions

    data = _write_questions(tmp_path)  # 3 questions, 1 to 4 responses each
    for executor, workers in (("local", "1"), ("ray", "2")):
        out = tmp_path / executor
        assert main(["bon", "--config", str(_config(tmp_path, data)), "--output_dir", str(out), "--progress", "false",
                     "--executor", executor, "--workers", workers]) == 0
        assert json.loads((out / "summary.json").read_text())["succeeded"] == 3
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert lines_by_id(ray / "scores.jsonl") == lines_by_id(local / "scores.jsonl")
    for name in ("scores.jsonl", "selected.jsonl", "bon_metrics.json", "bon_table.md"):  # even in input order
        assert (ray / name).read_bytes() == (local / name).read_bytes(), name


# -- failures and fatal errors read as with the local runner --------------------------------------------------------

def flaky(items):
    """Records, a Failure for id 4, a KeyError at id 7 (after its batch's earlier records were given), a
    FatalJobError at id 11."""
    from rlhf.jobs.runner import FatalJobError

    for item in items:
        if item["id"] == 4:
            yield Failure(4, "four\nlines")
        elif item["id"] == 7:
            raise KeyError("seven")
        elif item["id"] == 11:
            raise FatalJobError("the server went away")
        else:
            yield {"id": item["id"], "x": item["x"]}


def test_failures_and_a_fatal_error_read_as_with_the_local_runner(tmp_path, ray_session):
    from rlhf.jobs.runner import FatalJobError

    items = [{"id": i, "x": i} for i in range(11)]  # batches of 3: [6, 7, 8] gives 6, then 7 and 8 fail
    for executor in ("local", "ray"):
        run_job(items, flaky, tmp_path / executor, name="r", executor=executor,
                workers=2 if executor == "ray" else 1, batch_size=3, progress=False)
    for name in ("r.jsonl", "failures.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    failures = [json.loads(line) for line in (tmp_path / "ray" / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"id": 4, "reason": "four lines"}, {"id": "7", "reason": "KeyError: 'seven'"},
                        {"id": "8", "reason": "KeyError: 'seven'"}]
    with pytest.raises(FatalJobError) as raised:
        run_job([{"id": 11, "x": 11}], flaky, tmp_path / "fatal", name="r", executor="ray", progress=False)
    assert str(raised.value) == "r: stopped at id '11': the server went away"


# -- a killed worker -------------------------------------------------------------------------------------------------

class DyingWorker:
    """process_fn that doubles x; the worker process SIGKILLs itself on item 5 the first time (a marker file says
    it happened) and on item 9 every time."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, items):
        for item in items:
            if item["id"] == 9 or (item["id"] == 5 and not os.path.exists(self.marker)):
                Path(self.marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)
        return [{"id": item["id"], "double": 2 * item["x"]} for item in items]


def test_a_killed_worker_has_its_items_run_elsewhere_every_item_exactly_once(tmp_path, ray_session):
    from rlhf.jobs.ray_executor import MAX_BATCH_ATTEMPTS

    items = [{"id": i, "x": i} for i in range(14)]
    summary = run_job(items, DyingWorker(str(tmp_path / "died")), tmp_path / "out", name="doubles",
                      executor="ray", workers=2, batch_size=1, progress=False)
    assert (summary.succeeded, summary.failed) == (13, 1)
    records = [json.loads(line) for line in (tmp_path / "out" / "doubles.jsonl").read_text().splitlines()]
    # item 5's worker died once: it ran again on another and is there once; 9 killed its worker every time
    assert records == [{"id": i, "double": 2 * i} for i in range(14) if i != 9]
    [failure] = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert failure["id"] == "9" and f"died {MAX_BATCH_ATTEMPTS} times" in failure["reason"]


# -- a SIGKILLed driver ----------------------------------------------------------------------------------------------

def slow_double(items):
    time.sleep(0.15)
    return [{"id": item["id"], "double": 2 * item["x"]} for item in items]


DRIVER = """
import sys, ray
from rlhf.jobs.runner import run_job
from tests.test_ray import slow_double
ray.init(address=sys.argv[1], log_to_driver=False)
run_job([{"id": i, "x": i} for i in range(40)], slow_double, sys.argv[2], name="doubles", executor="ray",
        workers=2, batch_size=1, progress=False)
"""


def test_a_sigkilled_driver_rerun_loses_and_duplicates_nothing(tmp_path, ray_session):
    out = tmp_path / "out"
    results = out / "doubles.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ray_session, str(out)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not results.exists() or results.read_bytes().count(b"\n") < 6) and driver.poll() is None:
        assert time.monotonic() < deadline, "the driver committed nothing in 120 s"
        time.sleep(0.05)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver.stderr.close()
    before = results.read_bytes().count(b"\n")
    assert 6 <= before < 40
    summary = run_job([{"id": i, "x": i} for i in range(40)], slow_double, out, name="doubles", executor="ray",
                      workers=2, batch_size=1, progress=False)
    assert summary.skipped_done >= before and summary.skipped_done + summary.processed == 40
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert records == [{"id": i, "double": 2 * i} for i in range(40)]  # each once, in input order
    assert not (out / "failures.jsonl").read_text()


# -- without Ray ---------------------------------------------------------------------------------------------------

def test_executor_ray_without_ray_and_an_unknown_executor_are_one_line(tmp_path, monkeypatch, capsys):
    from rlhf import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(JobInputError, match=r"^executor 'ray' needs Ray: pip install -e \"\.\[ray\]\""):
        run_job([{"id": 1}], lambda items: [Failure(1, "")], tmp_path, name="r", executor="ray")
    with pytest.raises(JobInputError, match="^executor must be one of local, ray, got 'dask'$"):
        run_job([{"id": 1}], lambda items: [Failure(1, "")], tmp_path, name="r", executor="dask")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q", "question": "1 + 1?", "answer": "2"}) + "\n")
    code = cli.main(["rollout", "--questions", str(questions), "--output_dir", str(tmp_path / "out"), "--model",
                     "tiny-internvl", "--executor", "ray", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "executor 'ray' needs Ray" in err
