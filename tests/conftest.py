"""Shared fixtures: tiny models built in-process (no hub), small preference data written to tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core machine they run up to 10x slower: a module
    that marks itself with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` runs on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_processor():
    from rlhf.tiny import build_processor

    return build_processor()


@pytest.fixture
def tiny_internvl(tiny_processor):
    from rlhf.tiny import build_internvl

    return build_internvl(tiny_processor, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from rlhf.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-internvl")


def write_image(path: Path, color=(200, 30, 30), size=(112, 112)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_records(root: Path, n: int = 8, text_every: int = 2):
    """Preference records: every `text_every`-th one text-only, the rest with one image."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    records = []
    for i in range(n):
        paths = [] if i % text_every == 1 else [str(write_image(root / f"img{i}.png", colors[i % 4]))]
        records.append(SimpleNamespace(
            question=("<image>\n" if paths else "") + f"What is {i} + {i % 3}?",
            chosen=f"{i} + {i % 3} = {i + i % 3}. Answer: \\boxed{{{i + i % 3}}}",
            rejected=f"{i} + {i % 3} = {i + i % 3 + 1}. Answer: \\boxed{{{i + i % 3 + 1}}}",
            image_paths=paths, tiles_per_image=1, source="tiny", line=i + 1,
        ))
    return records


@pytest.fixture
def preference_rows(tmp_path, tiny_processor):
    from datasets import Dataset

    from rlhf.collator import record_to_row

    return Dataset.from_list([record_to_row(r, tiny_processor) for r in make_records(tmp_path)])


def write_mmpr(root: Path, n: int = 8) -> Path:
    """A tiny MMPR folder: meta.json + annotation JSON lines + images."""
    ann = root / "ann.jsonl"
    with ann.open("w") as f:
        for i, r in enumerate(make_records(root / "images", n)):
            rec = {"question": r.question, "chosen": r.chosen, "rejected": r.rejected}
            if r.image_paths:
                rec["image"] = Path(r.image_paths[0]).name
            f.write(json.dumps(rec) + "\n")
    meta = {"tiny": {"root": str(root / "images"), "annotation": str(ann), "data_augment": False,
                     "repeat_time": 1, "length": n, "max_dynamic_patch": 1}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def stop_at_step(step: int):
    """A TrainerCallback that stops training after optimizer step `step` (the interrupted half of resume tests)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True
            return control

    return StopAt()
