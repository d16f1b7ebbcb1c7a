"""Two CPU processes (gloo): every rank holds the same δ, and mixed text-only / image batches train."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_reward_shift_is_synchronised(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["shift"]) == 4
    assert r0["shift"] == r1["shift"]  # bit-identical on both ranks
    assert r0["count"] == r1["count"] == 4 * 2  # published δ: 4 steps x 2 ranks, one batch mean each
    assert any(abs(s) > 0 for s in r0["shift"][1:])
    assert r0["param_sum"] == pytest.approx(r1["param_sum"], rel=1e-9)  # DDP kept the replicas in step
