"""`rlhf.checkpoint.ResumeMixin` on a stand-in for `transformers.Trainer`: the trainer's own state goes into every
checkpoint and comes back on resume (MPOTrainer's δ end to end: tests/test_mpo_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.checkpoint import ResumeMixin


class FakeTrainer:
    """What ResumeMixin uses of `transformers.Trainer`: `_save_checkpoint` writes checkpoint-{step}, `train` says
    which checkpoint it resumed from."""

    def __init__(self, output_dir):
        self.args = SimpleNamespace(output_dir=str(output_dir), should_save=True)
        self.state = SimpleNamespace(global_step=0)

    def _get_output_dir(self, trial):
        return self.args.output_dir

    def _save_checkpoint(self, model, trial):
        (Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}").mkdir(parents=True)

    def train(self, resume_from_checkpoint=None, **kwargs):
        return resume_from_checkpoint


class Counting(ResumeMixin, FakeTrainer):
    state_file = "count.json"

    def __init__(self, output_dir):
        super().__init__(output_dir)
        self.count, self.loaded = 0, []

    def extra_state(self):
        return {"count": self.count}

    def load_extra_state(self, state, checkpoint):
        self.loaded.append((state, Path(checkpoint).name))
        if state is not None:
            self.count = state["count"]


def test_state_is_saved_in_each_checkpoint_and_restored(tmp_path):
    first = Counting(tmp_path)
    for step, count in ((2, 5), (4, 9)):
        first.state.global_step, first.count = step, count
        first._save_checkpoint(None, None)
    assert json.loads((tmp_path / "checkpoint-2" / "count.json").read_text()) == {"count": 5}
    assert (tmp_path / "checkpoint-4" / "count.json").read_text() == '{\n  "count": 9\n}\n'
    again = Counting(tmp_path)
    assert again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    assert (again.count, again.loaded) == (5, [({"count": 5}, "checkpoint-2")])
    last = Counting(tmp_path)  # True: the last checkpoint of output_dir, handed on to the Trainer as a path
    assert last.train(resume_from_checkpoint=True) == str(tmp_path / "checkpoint-4") and last.count == 9
    fresh = Counting(tmp_path)
    assert fresh.train() is None and fresh.loaded == []  # no resume: nothing read


def test_missing_state_file_and_missing_checkpoint(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    trainer = Counting(tmp_path)
    trainer.train(resume_from_checkpoint=True)
    assert (trainer.count, trainer.loaded) == (0, [(None, "checkpoint-3")])  # the subclass decides what that means
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^no checkpoint found in .*empty to resume from$"):
        Counting(tmp_path / "empty").train(resume_from_checkpoint=True)


def test_without_state_file_resume_is_the_trainers_own(tmp_path):
    class Plain(ResumeMixin, FakeTrainer):
        pass

    plain = Plain(tmp_path)
    plain._save_checkpoint(None, None)
    assert [p.name for p in (tmp_path / "checkpoint-0").iterdir()] == []  # no extra file
    assert plain.train(resume_from_checkpoint=True) is True  # resolved by the Trainer, as before
