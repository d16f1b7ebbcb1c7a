"""benchmarks/gpu.py, the GPU benchmark driver, as a dry run on the CPU at toy sizes: every section's command runs
and prints its table. (The numbers come from a GPU run; see benchmarks/README.md.)"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_commands_cover_every_section_within_the_gpu_budget():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    plan = gpu.commands("cuda", False, "/tmp/w", None)
    assert list(plan) == list(gpu.SECTIONS)
    assert sum(budget for _, budget in plan.values()) <= 8 * 60 - 30  # under 8 minutes with start-up to spare
    assert "flex_attention" in plan["mpo_step"][0] and "--liger-kernels" in plan["mpo_step"][0]
    assert plan["label_steps"][0][:4] == ["label_steps.py", "--backend", "vllm", "--prefix_caching"]
    assert gpu.commands("cuda", False, "/tmp/w", "ckpt")["label_steps"][0][-2:] == ["--policy", "ckpt"]


@pytest.mark.slow
def test_dry_run_prints_every_table(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--work_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert "| tokens per side | method | extra peak (GB)" in out  # mpo_loss
    assert "| config | LM tokens / pair |" in out and "| all |" in out  # mpo_step
    assert "| method | forward calls |" in out and "shared_prefix" in out  # prm_scoring
    assert "| early stop | | faithful | adaptive | search |" in out  # label_steps
    assert "not finished" not in out
