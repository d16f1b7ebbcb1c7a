"""`mmalign rollout --backend openai` against a real `transformers serve` on 127.0.0.1, started here with a tiny
random-weight text model saved by the test (`transformers[serving]`, in the dev dependencies).

What the real server does (transformers 5.24) and what the job must do about it: it answers HTTP 422 for `top_k`
(dropped, one logged line), returns one choice for n > 1 (each sample its own seeded request), refuses
`continue_final_message` (label-steps fails up front, one line); killed mid-run, the job stops with one line after
a few refused connections, keeping every committed record. The server takes ~10-30 s to start on 2 busy cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from rlhf import cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn"))
                       or shutil.which("transformers") is None,
                       reason="needs transformers[serving] (pip install -e '.[dev]')"),
]
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base_url, model name, process) of a `transformers serve` of a tiny text model that samples."""
    from rlhf.tiny import save_tiny

    model = save_tiny(tmp_path_factory.mktemp("served") / "tiny-text", text_only=True)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(config | {"do_sample": True}))  # else it is greedy
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    log = (model.parent / "serve.log").open("w")
    proc = subprocess.Popen(["transformers", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"transformers serve did not start: {(model.parent / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url, str(model), proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


def questions(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(n)))
    return path


def rollout_argv(url: str, model: str, qfile: Path, out: Path) -> list[str]:
    kwargs = {"base_url": url, "max_retries": 1, "timeout_s": 30, "max_concurrency": 1, "backoff_base_s": 0.05,
              "max_connection_failures": 2}
    return ["rollout", "--questions", str(qfile), "--output_dir", str(out), "--backend", "openai", "--model", model,
            "--backend_kwargs", json.dumps(kwargs), "--num_samples", "2", "--max_new_tokens", "4",
            "--batch_size", "1", "--progress", "false"]


def records(out: Path) -> list[dict]:
    path = out / "rollouts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_rollout_against_transformers_serve_then_a_kill_mid_run(served, tmp_path, capsys, caplog):
    url, model, proc = served
    # 1. the whole job: top_k dropped, n split into seeded requests, the settings sent recorded per record
    with caplog.at_level("WARNING", logger="mmalign.backends.openai"):
        assert cli.main(rollout_argv(url, model, questions(tmp_path / "q.jsonl", 3), tmp_path / "a")) == 0
    logged = [r.message for r in caplog.records]
    assert sum("rejects top_k" in m for m in logged) == 1
    assert sum("each sample is its own request" in m for m in logged) == 1
    assert not any("greedily" in m for m in logged)  # do_sample in its generation_config: it samples
    done = records(tmp_path / "a")
    assert [r["id"] for r in done] == ["q0", "q1", "q2"]
    for r in done:
        assert len(r["responses"]) == 2
        applied = r["sampling"]["applied"]
        assert applied["dropped"] == ["top_k"] and applied["requests"] == 2 and applied["n_per_request"] == 1
        assert applied["temperature"] == 0.7 and applied["max_tokens"] == 4 and "top_k" not in applied

    # 2. label-steps needs continue_final_message, which this server refuses: one line before any work
    solutions = tmp_path / "s.jsonl"
    solutions.write_text(json.dumps({"id": "s", "question": "1 + 2?", "answer": "3",
                                     "solution": "1 + 2 = 3.\n\nAnswer: \\boxed{3}"}) + "\n")
    capsys.readouterr()
    argv = ["label-steps", "--solutions", str(solutions), "--output_dir", str(tmp_path / "l"), "--backend", "openai",
            "--model", model, "--backend_kwargs", json.dumps({"base_url": url}), "--progress", "false"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot continue a partial assistant message" in err and len(err.strip().splitlines()) == 1

    # 3. the server is killed mid-run: the job stops with one line, the committed records stay
    out = tmp_path / "b"
    argv = rollout_argv(url, model, questions(tmp_path / "q40.jsonl", 40), out)
    status: list[int] = []
    job = threading.Thread(target=lambda: status.append(cli.main(argv)))
    capsys.readouterr()
    job.start()
    deadline = time.monotonic() + 120
    while len(records(out)) < 2 and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    job.join(timeout=120)
    assert not job.is_alive() and status == [2]
    assert time.monotonic() - killed < 30  # two refused connections and one GET /models, not 38 items x retries
    kept = records(out)
    with capsys.disabled():
        print(f"\nkill mid-run: {len(kept)} of 40 records kept, stopped {time.monotonic() - killed:.1f} s after it")
    assert 2 <= len(kept) < 40 and all(len(r["responses"]) == 2 for r in kept)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "server stopped answering" in line]
    assert len(lines) == 1 and lines[0].startswith("mmalign rollout: rollouts: stopped at id")
    assert "rerun to resume" in lines[0]
