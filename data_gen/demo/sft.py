"""Stage 1 of the demo: supervised warm-up of a tiny InternVL policy on the tile-sum task.

A random-weight tiny InternVL (`rlhf.tiny`) learns to answer `data_gen.demo.task` questions in the gold chain-of-thought
format, so that its greedy accuracy is well below its pass@8: the room that MPO, the PRM and Best-of-N need.

- data: training items made on the fly by `TileSumTask.item("train", i)` (deterministic, never stored);
- prompt: ChatML with the question alone (`PromptTemplate.PLAIN`, one `<image>`, tile budget 1); the target is the
  gold solution + `<|im_end|>`, and the loss covers those tokens only (`labels` are -100 on the prompt);
- training: transformers `Trainer`, checkpoints every `save_steps`, resumed from the last one on a rerun;
- result: `OUTPUT_DIR/final` (safetensors model + processor, `from_pretrained` loads both) and
  `OUTPUT_DIR/sft_done.json` (settings and metrics: loss, timings, greedy accuracy, pass@k); a rerun with the same
  settings finds that marker and returns at once.

    mmalign demo-sft --config data_gen/recipes/demo/sft.yaml [--quick] [--field value ...]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from rlhf.errors import UserError
from rlhf.processing import IM_END, InternVLChatProcessor, chat_prompt
from rlhf.tiny import TinySizes

from ..prompts import PromptTemplate, build_prompt
from .settings import VALIDATION_START
from .task import LAYOUT_HELP, TileSumTask

logger = logging.getLogger("mmalign.sft")

DONE_FILE = "sft_done.json"
CONFIG_FILE = "sft_config.json"
RESPONSES_FILE = "greedy_responses.jsonl"
FINAL_DIR = "final"
SIZES_FILE = "mmalign_tiny.json"
IGNORE_INDEX = -100
# the TinySizes fields a recipe may set (heads, tile and patch size stay as rlhf.tiny has them)
SIZE_FIELDS = ("vision_hidden", "vision_layers", "text_hidden", "text_layers", "text_intermediate")
# `--quick`: a CI-sized run (well under a minute on 2 CPU cores); these fields replace the recipe's
QUICK: dict[str, Any] = {"steps": 12, "batch_size": 8, "save_steps": 6, "logging_steps": 3,
                         "eval_items": 16, "eval_samples": 2}


# -- data ------------------------------------------------------------------------------------------------------------


class TileSumItems(Dataset):
    """Items `start` .. `start + length - 1` of a `TileSumTask` split, each rendered when asked for."""

    def __init__(self, task: TileSumTask, length: int, split: str = "train", start: int = 0):
        self.task, self.length, self.split, self.start = task, length, split, start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"item {index} of {self.length}")
        item = self.task.item(self.split, self.start + index)
        return {"id": item.id, "image": item.image, "question": item.question, "solution": item.solution,
                "cells": [t.cell for t in item.tiles], "values": item.values, "grid": self.task.grid}


@dataclass
class SFTCollator:
    """Examples {"image", "question", "solution"} -> a right-padded batch for `InternVLForConditionalGeneration`.

    Sequence: `chat_prompt(build_prompt(question, template))` with the image expanded into its tile tokens, then
    `solution + <|im_end|>`, prompt and answer tokenized apart (as at generation time, where the prompt is
    tokenized and the answer produced token by token). `labels` equal the answer tokens and are -100 elsewhere.

    Examples that carry the board ("cells", "values", "grid") also get `cell_labels`: one row per example, one
    entry per image token, the token id of the digit its cell shows ("0" for an empty cell; -100 for every token
    of an example without a board). With one tile of `grid` x `grid` image tokens (one per 28 px cell after
    pixel-unshuffle, row-major like the cells), image token k covers cell k. The trainer's auxiliary reading target
    uses them and drops them otherwise."""

    processor: InternVLChatProcessor
    template: str = PromptTemplate.PLAIN
    max_patches: int = 1

    def encode(self, example: dict[str, Any]) -> tuple[list[int], list[int], torch.Tensor]:
        """(prompt ids, answer ids, pixel values) of one example."""
        prompt = chat_prompt(build_prompt(example["question"], self.template))
        feats = self.processor(text=[prompt], images=[[example["image"].convert("RGB")]],
                               max_patches=[self.max_patches], return_tensors=None)
        answer = self.processor.encode(example["solution"] + IM_END)
        return feats["input_ids"][0], answer, feats["pixel_values"]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(e) for e in examples]
        width = max(len(p) + len(a) for p, a, _ in encoded)
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (prompt, answer, _) in enumerate(encoded):
            n = len(prompt) + len(answer)
            input_ids[row, :n] = torch.tensor(prompt + answer)
            labels[row, len(prompt):n] = torch.tensor(answer)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "pixel_values": torch.cat([pv for _, _, pv in encoded])}
        if any("cells" in e for e in examples):
            batch["cell_labels"] = self.cell_labels(examples, input_ids)
        return batch

    def cell_labels(self, examples: list[dict[str, Any]], input_ids: torch.Tensor) -> torch.Tensor:
        image_tokens = (input_ids == self.processor.image_token_id).sum(1)
        out = torch.full((len(examples), int(image_tokens.max())), IGNORE_INDEX, dtype=torch.long)
        digits = [self.processor.encode(str(d)) for d in range(10)]
        if any(len(d) != 1 for d in digits):
            raise ValueError("SFTCollator: the tokenizer does not encode each digit 0-9 as one token")
        for row, e in enumerate(examples):
            if "cells" not in e:
                continue
            if int(image_tokens[row]) != e["grid"] ** 2:
                raise ValueError(f"SFTCollator: example {e.get('id')!r} has {int(image_tokens[row])} image "
                                 f"tokens, the cell reading target needs one per cell ({e['grid']}**2)")
            board = [0] * e["grid"] ** 2
            for cell, value in zip(e["cells"], e["values"], strict=True):
                board[cell] = value
            out[row, : len(board)] = torch.tensor([digits[v][0] for v in board])
        return out


# -- training --------------------------------------------------------------------------------------------------------


def _sft_trainer_class():
    """`Trainer` with the auxiliary reading target, whose resume restores InternVL weights saved under legacy key
    names (`rlhf.checkpoint.ResumeMixin`, as MPOTrainer and VisualPRMTrainer)."""
    from transformers import Trainer

    from rlhf.checkpoint import ResumeMixin

    class SFTTrainer(ResumeMixin, Trainer):
        def __init__(self, *args, reading_loss_weight: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.reading_loss_weight = reading_loss_weight
            self._reading_losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The language-model loss on the answer tokens, plus with `reading_loss_weight` > 0 the auxiliary
            reading target: at every image token the model's own head predicts the digit of that token's cell
            ("0" when empty), cross-entropy averaged over the cells. It gives the vision tower, the projector and
            the language model a dense signal about every cell from the first step, where the answer alone
            rewards reading only once the language model already attends to the right cell."""
            cells = inputs.pop("cell_labels", None)
            if not self.reading_loss_weight or cells is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            image = inputs["input_ids"] == self.processing_class.image_token_id
            logits = outputs.logits[image].float()  # the model's own head at the image tokens, from the same pass
            targets = torch.cat([cells[r, : int(n)] for r, n in enumerate(image.sum(1))])  # rows' image tokens
            reading = torch.nn.functional.cross_entropy(logits, targets.to(logits.device), ignore_index=IGNORE_INDEX)
            self._reading_losses.append(float(reading.detach()))
            loss = loss + self.reading_loss_weight * reading
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._reading_losses and "loss" in logs:
                logs["reading_loss"] = round(sum(self._reading_losses) / len(self._reading_losses), 4)
                self._reading_losses.clear()
            super().log(logs, *args, **kwargs)

    return SFTTrainer


class _Timer(TrainerCallback):
    """Wall-clock and process CPU seconds of the training steps run in this process (a resumed run counts only
    its own steps). CPU seconds do not grow when other programs share the cores, so they compare across loads."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.first_step = self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    def metrics(self) -> dict[str, float | int | None]:
        steps = self.last_step - self.first_step
        return {"resumed_from_step": self.first_step, "timed_steps": steps, "train_wall_s": round(self.wall, 2),
                "train_cpu_s": round(self.cpu, 2), "s_per_step": round(self.wall / steps, 4) if steps else None,
                "cpu_s_per_step": round(self.cpu / steps, 4) if steps else None,
                "torch_threads": torch.get_num_threads()}


FALLBACK_FILE = "band_fallback.safetensors"  # the last in-band check's weights (band-safe stop)


class _StopAtAccuracy(TrainerCallback):
    """Stop training once greedy accuracy on `n_items` validation items reaches `threshold`, checked every `every`
    steps from step `after` on. The tile-sum policy learns to read the colours abruptly (sample accuracy 14% after
    550 steps, 89% after 650 in the demo's recipe), so a fixed step count cannot aim at a middle accuracy; this can.
    The validation items come from the train split at VALIDATION_START, never used for training or rollouts.

    With `overshoot_above`, a stop is band-safe: the weights of the last check whose accuracy was at least
    `fallback_at_least` (and below `threshold`) are written to `FALLBACK_FILE` in the run folder, and a check that
    jumps past `threshold` and above `overshoot_above` stops training with those weights put back (the partial sums
    are learned as a jump: seed 0 went from 41% to 67% in 20 steps). Without such an earlier check the overshooting
    weights stay. The file is the only copy, so a resumed run puts back the same weights."""

    def __init__(self, processor, task: TileSumTask, threshold: float, every: int, after: int, n_items: int,
                 overshoot_above: float | None = None, fallback_at_least: float = 0.0):
        self.processor, self.threshold, self.every, self.after = processor, threshold, every, after
        self.overshoot_above, self.fallback_at_least = overshoot_above, fallback_at_least
        self.items = task.items("train", n_items, start=VALIDATION_START)
        self.history: list[tuple[int, float]] = []
        self.stopped_at: int | None = None
        self.restored: tuple[int, float] | None = None  # (step, accuracy) of the weights put back
        self._fallback: tuple[int, float] | None = None  # (step, accuracy) of the weights in FALLBACK_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run takes back the in-band weights an earlier part of it kept (none from a later step)."""
        from safetensors import safe_open

        path = Path(args.output_dir) / FALLBACK_FILE
        if self.overshoot_above is not None and path.is_file():
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            if int(meta["step"]) <= state.global_step:
                self._fallback = (int(meta["step"]), float(meta["accuracy"]))
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step < self.after or step % self.every or step >= state.max_steps:
            return control
        from .accuracy import greedy_accuracy

        acc, _ = greedy_accuracy(model, self.processor, self.items)
        self.history.append((step, round(acc, 4)))
        logger.info("demo SFT: step %d, greedy accuracy on %d validation items %.3f (stop at %.3f)", step,
                    len(self.items), acc, self.threshold)
        if acc < self.threshold:
            if self.overshoot_above is not None and acc >= self.fallback_at_least:
                from safetensors.torch import save_file

                weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # tied: copies
                path = Path(args.output_dir) / FALLBACK_FILE
                save_file(weights, str(path.with_suffix(".tmp")),
                          metadata={"step": str(step), "accuracy": str(round(acc, 4))})
                path.with_suffix(".tmp").replace(path)
                self._fallback = (step, round(acc, 4))
            return control
        self.stopped_at = step
        control.should_training_stop = True
        control.should_save = True
        if self.overshoot_above is not None and acc > self.overshoot_above and self._fallback is not None:
            from safetensors.torch import load_file

            fallback_step, fallback_acc = self._fallback
            model.load_state_dict(load_file(str(Path(args.output_dir) / FALLBACK_FILE)))
            self.restored = (fallback_step, fallback_acc)
            logger.info("demo SFT: %.3f at step %d overshoots %.3f: the weights of step %d (%.3f) are put back",
                        acc, step, self.overshoot_above, fallback_step, fallback_acc)
        return control

    def metrics(self) -> dict[str, Any]:
        """The checks, where training stopped, and the step and validation accuracy of the weights kept (the
        restored ones after an overshoot, else the last check's)."""
        kept = self.restored or (self.history[-1] if self.history else None)
        return {"stopped_at_step": self.stopped_at, "validation_history": self.history,
                "policy_step": kept[0] if kept else None, "policy_validation_accuracy": kept[1] if kept else None,
                "restored_after_overshoot": self.restored is not None}


def _settings(**kwargs: Any) -> dict[str, Any]:
    """JSON-ready settings of a run (what makes its result); compared with the stored ones on a rerun."""
    out = {}
    for key, value in kwargs.items():
        out[key] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return json.loads(json.dumps(out))


def train_sft(
    output_dir: str | Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    sizes: TinySizes = TinySizes(),
    task: TileSumTask = TileSumTask(),
    train_task: TileSumTask | None = None,
    num_train_items: int | None = None,
    lr_scheduler_type: str = "cosine",
    warmup_steps: float = 0.05,
    weight_decay: float = 0.0,
    save_steps: int = 100,
    logging_steps: int = 25,
    eval_items: int = 200,
    eval_samples: int = 8,
    eval_temperature: float = 0.8,
    eval_batch_size: int = 64,
    stop_at_accuracy: float | None = None,
    stop_check_every: int = 25,
    stop_check_after: int = 0,
    stop_check_items: int = 64,
    stop_overshoot_above: float | None = None,
    stop_fallback_at_least: float = 0.0,
    reading_loss_weight: float = 0.0,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Train (or resume, or find finished) the warm-up policy in `output_dir`; returns the `final` folder.

    `num_train_items` distinct training items are used (default `steps * batch_size`: no item seen twice), drawn
    from `train_task` (default `task`; a curriculum by mixture trains on more kinds of boards, e.g. fewer tiles,
    than the task the policy is validated and evaluated on). After
    training, `eval_items` test items are answered greedily and, when `eval_samples` > 0, sampled that many times at
    `eval_temperature`; the accuracies go into `sft_done.json` with the loss and timings, and the greedy responses
    into `greedy_responses.jsonl`. `callbacks` are extra `TrainerCallback`s (progress reporting, tests).
    With `stop_at_accuracy`, training stops at the first check (every `stop_check_every` steps from
    `stop_check_after` on) whose greedy accuracy on `stop_check_items` validation items reaches it; with
    `stop_overshoot_above`, a check that jumps above it puts back the weights of the last check at or above
    `stop_fallback_at_least` (`_StopAtAccuracy`).
    `reading_loss_weight` > 0 adds the auxiliary reading target (see `SFTTrainer.compute_loss`) with that weight."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from rlhf.models import save_model_and_processor
    from rlhf.tiny import build_internvl, build_processor

    checks = {"steps": (steps, steps >= 1), "batch_size": (batch_size, batch_size >= 1),
              "learning_rate": (learning_rate, learning_rate > 0), "save_steps": (save_steps, save_steps >= 1),
              "num_train_items": (num_train_items, num_train_items is None or num_train_items >= 1),
              "eval_items": (eval_items, eval_items >= 0), "eval_samples": (eval_samples, eval_samples >= 0),
              "stop_at_accuracy": (stop_at_accuracy, stop_at_accuracy is None or 0 < stop_at_accuracy <= 1),
              "stop_check_every": (stop_check_every, stop_check_every >= 1),
              "stop_check_items": (stop_check_items, stop_check_items >= 1),
              "stop_overshoot_above": (stop_overshoot_above, stop_overshoot_above is None or (
                  stop_at_accuracy is not None and stop_at_accuracy <= stop_overshoot_above <= 1)),
              "stop_fallback_at_least": (stop_fallback_at_least, 0 <= stop_fallback_at_least <= (
                  stop_at_accuracy if stop_at_accuracy is not None else 1)),
              "reading_loss_weight": (reading_loss_weight, reading_loss_weight >= 0)}
    bad = [f"{name}={value!r}" for name, (value, ok) in checks.items() if not ok]
    if bad:
        raise UserError(f"demo SFT: invalid {', '.join(bad)} (counts must be >= 1, eval counts >= 0, "
                        "learning_rate > 0, stop_fallback_at_least <= stop_at_accuracy <= stop_overshoot_above <= 1)")
    output_dir = Path(output_dir)
    final = output_dir / FINAL_DIR
    num_train_items = num_train_items or steps * batch_size
    settings = _settings(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed, sizes=sizes,
                         task=task, **({"train_task": train_task} if train_task not in (None, task) else {}),
                         num_train_items=num_train_items, lr_scheduler_type=lr_scheduler_type,
                         warmup_steps=warmup_steps, weight_decay=weight_decay,
                         **({"stop_at_accuracy": stop_at_accuracy, "stop_check_every": stop_check_every,
                             "stop_check_after": stop_check_after, "stop_check_items": stop_check_items}
                            if stop_at_accuracy is not None else {}),
                         **({"stop_overshoot_above": stop_overshoot_above,
                             "stop_fallback_at_least": stop_fallback_at_least}
                            if stop_overshoot_above is not None else {}),
                         **({"reading_loss_weight": reading_loss_weight} if reading_loss_weight else {}))
    done = output_dir / DONE_FILE
    config = output_dir / CONFIG_FILE
    if config.is_file():
        stored = json.loads(config.read_text())
        if stored != settings:
            diff = ", ".join(f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in settings.items()
                             if stored.get(k) != v)
            raise UserError(f"{output_dir} holds a demo SFT run with other settings ({diff}); "
                            "choose another output_dir or delete that one")
        if done.is_file() and (final / "model.safetensors").is_file():
            logger.info("demo SFT already done: %s", final)
            return final
    output_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(settings, indent=2) + "\n")

    processor = build_processor(sizes, max_patches=1)
    model = build_internvl(processor, sizes, seed=seed)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_steps,
        weight_decay=weight_decay, seed=seed, data_seed=seed, logging_steps=logging_steps, save_strategy="steps",
        save_steps=save_steps, save_total_limit=1, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
    )
    timer = _Timer()
    stopper = (_StopAtAccuracy(processor, task, stop_at_accuracy, stop_check_every, stop_check_after,
                               stop_check_items, stop_overshoot_above, stop_fallback_at_least)
               if stop_at_accuracy is not None else None)
    callbacks = [*callbacks, *([stopper] if stopper else [])]
    trainer = _sft_trainer_class()(
        model=model, args=args, train_dataset=TileSumItems(train_task or task, num_train_items),
        data_collator=SFTCollator(processor),
        processing_class=processor, callbacks=[timer, *callbacks], reading_loss_weight=reading_loss_weight)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last:
        logger.info("resuming demo SFT from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, Any] = {"steps": trainer.state.global_step, **timer.metrics(),
                               **(stopper.metrics() if stopper else {})}
    metrics["train_loss"] = round(result.training_loss, 4) if metrics["timed_steps"] else None  # of this call
    metrics["last_logged_loss"] = round(losses[-1], 4) if losses else None
    model = trainer.model.eval()
    if eval_items:
        logger.info("demo SFT: evaluating on %d test items (greedy%s)", eval_items,
                    f", then {eval_samples} samples each at temperature {eval_temperature}" if eval_samples else "")
        metrics.update(_evaluate(model, processor, task, eval_items, eval_samples, eval_temperature,
                                 eval_batch_size, seed, output_dir / RESPONSES_FILE))
    save_model_and_processor(model, processor, final)
    (final / SIZES_FILE).write_text(json.dumps(asdict(sizes)) + "\n")
    done.write_text(json.dumps({"model": FINAL_DIR, "settings": settings, "metrics": metrics}, indent=2) + "\n")
    logger.info("demo SFT: %s", ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return final


def _evaluate(model, processor, task: TileSumTask, n_items: int, n_samples: int, temperature: float,
              batch_size: int, seed: int, responses_path: Path) -> dict[str, Any]:
    from reward.verify import is_correct

    from .accuracy import first_error, first_errors, greedy_accuracy, sample_accuracy

    items = task.items("test", n_items)
    start = time.perf_counter()
    acc, responses = greedy_accuracy(model, processor, items, batch_size=batch_size)
    out: dict[str, Any] = {"eval_items": n_items, "greedy_accuracy": round(acc, 4),
                           "greedy_first_errors": first_errors(items, responses),
                           "greedy_eval_s": round(time.perf_counter() - start, 2)}
    with responses_path.open("w", encoding="utf-8") as f:
        for it, response in zip(items, responses):
            f.write(json.dumps({"id": it.id, "answer": it.answer, "response": response,
                                "correct": is_correct(response, it.answer),
                                "first_error": first_error(it, response).value}) + "\n")
    if n_samples:
        start = time.perf_counter()
        scores = sample_accuracy(model, processor, items, n=n_samples, temperature=temperature,
                                 batch_size=batch_size, seed=seed)
        out.update({f"pass@{n_samples}": round(scores.pass_at_n, 4),
                    f"majority@{n_samples}": round(scores.majority_at_n, 4),
                    "sample_accuracy": round(scores.mean_accuracy, 4), "sample_temperature": temperature,
                    "sample_eval_s": round(time.perf_counter() - start, 2)})
    return out


# -- command line ----------------------------------------------------------------------------------------------------


@dataclass
class SFTArguments:
    """`mmalign demo-sft` settings (data_gen/recipes/demo/sft.yaml); see `train_sft` for what each does."""

    output_dir: str = field(default="runs/demo/sft", metadata={"help": "Run folder (checkpoints, final, marker)."})
    steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Items per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps, or a fraction of steps if < 1."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial weights and the data order."})
    num_train_items: int | None = field(default=None, metadata={
        "help": "Distinct training items (default steps * batch_size: each item seen once)."})
    min_tiles: int = field(default=TileSumTask.min_tiles, metadata={"help": "Fewest tiles per image."})
    max_tiles: int = field(default=TileSumTask.max_tiles, metadata={"help": "Most tiles per image."})
    layout: str = field(default=TileSumTask.layout, metadata={
        "help": LAYOUT_HELP})
    train_min_tiles: int | None = field(default=None, metadata={
        "help": "Fewest tiles per training image (None: min_tiles); validation and evaluation keep min_tiles."})
    vision_hidden: int = field(default=TinySizes.vision_hidden, metadata={"help": "Vision tower width."})
    vision_layers: int = field(default=TinySizes.vision_layers, metadata={"help": "Vision tower depth."})
    text_hidden: int = field(default=TinySizes.text_hidden, metadata={"help": "Language model width."})
    text_layers: int = field(default=TinySizes.text_layers, metadata={"help": "Language model depth."})
    text_intermediate: int = field(default=TinySizes.text_intermediate, metadata={"help": "Language MLP width."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every this many steps (for resuming)."})
    logging_steps: int = field(default=25, metadata={"help": "Log the loss every this many steps."})
    eval_items: int = field(default=200, metadata={"help": "Held-out test items evaluated after training."})
    eval_samples: int = field(default=8, metadata={"help": "Samples per test item for pass@k (0: greedy only)."})
    eval_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of that evaluation."})
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences decoded together."})
    stop_at_accuracy: float | None = field(default=None, metadata={
        "help": "Stop once greedy accuracy on validation items reaches this (None: run every step)."})
    stop_check_every: int = field(default=25, metadata={"help": "Steps between those checks."})
    stop_check_after: int = field(default=0, metadata={"help": "First step that is checked."})
    stop_check_items: int = field(default=64, metadata={"help": "Validation items per check."})
    stop_overshoot_above: float | None = field(default=None, metadata={
        "help": "Band-safe stop: a check that jumps past stop_at_accuracy to above this puts back the weights of the "
                "last check at or above stop_fallback_at_least (None: keep the overshooting weights)."})
    stop_fallback_at_least: float = field(default=0.0, metadata={
        "help": "Lowest validation accuracy of a check whose weights a band-safe stop may put back."})
    reading_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of the auxiliary reading target: each image token predicts its cell's digit (0: off)."})
    quick: bool = field(default=False, metadata={"help": "CI-sized run: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()) + " (replacing the recipe's)."})

    def train_kwargs(self) -> dict[str, Any]:
        args = replace(self, **QUICK) if self.quick else self
        task_fields = {"min_tiles", "max_tiles", "layout", "train_min_tiles"}
        skip = task_fields | set(SIZE_FIELDS) | {"output_dir", "quick"}
        kwargs = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in skip}
        kwargs["sizes"] = replace(TinySizes(), **{name: getattr(args, name) for name in SIZE_FIELDS})
        try:
            kwargs["task"] = TileSumTask(min_tiles=args.min_tiles, max_tiles=args.max_tiles, layout=args.layout)
            if args.train_min_tiles is not None:
                kwargs["train_task"] = replace(kwargs["task"], min_tiles=args.train_min_tiles)
        except UserError as err:
            raise UserError(f"demo SFT recipe: {err}") from None
        return kwargs


def parse(argv: list[str]) -> SFTArguments:
    from trl import TrlParser

    (args,) = TrlParser((SFTArguments,), prog="mmalign demo-sft").parse_args_and_config(args=argv)
    return args


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    final = train_sft(args.output_dir, **args.train_kwargs())
    done = json.loads((Path(args.output_dir) / DONE_FILE).read_text())
    print(json.dumps(done["metrics"], indent=2))
    print(f"model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
