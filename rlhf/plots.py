"""PNG plots of training histories (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay `fig` out, write it as a PNG at `path` (folders made) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_mpo_history(log_history: list[dict], path: str | Path) -> Path | None:
    """Reward margins/accuracy and the three unweighted MPO terms against the step."""
    rows = [h for h in log_history if "mpo/preference_loss" in h or "rewards/margins" in h]
    if not rows:
        return None
    steps = [h.get("step", i) for i, h in enumerate(rows)]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for key in ("rewards/margins", "rewards/accuracies", "mpo/reward_shift"):
        if any(key in h for h in rows):
            left.plot(steps, [h.get(key, float("nan")) for h in rows], label=key)
    left.set_xlabel("step")
    left.set_title("rewards")
    left.legend()
    for key in ("mpo/preference_loss", "mpo/quality_loss", "mpo/generation_loss"):
        if any(key in h for h in rows):
            right.plot(steps, [h.get(key, float("nan")) for h in rows], label=key.split("/")[1])
    right.set_xlabel("step")
    right.set_title("MPO terms (unweighted)")
    right.legend()
    return save_figure(fig, path)
