"""Recipes parse into the job's dataclasses with the published numbers; the TRL internals we override exist."""

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {  # reference section 1: InternVL3 MPO runs
    "1b": (2e-7, 12288, "zero1.json"), "2b": (2e-7, 12288, "zero1.json"),
    "8b": (2e-7, 12288, "zero3.json"), "14b": (2e-7, 12288, "zero3.json"),
    "38b": (2e-7, 8192, "zero3_offload.json"), "78b": (2e-7, 8192, "zero3_offload.json"),
}


def mpo_fields() -> set[str]:
    from trl import ModelConfig

    from rlhf.mpo_config import MPOConfig
    from rlhf.mpo_job import MPOScriptArguments

    return {f.name for cls in (MPOScriptArguments, MPOConfig, ModelConfig) for f in fields(cls)}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_internvl3_recipes(size):
    recipe = yaml.safe_load((ROOT / f"recipes/mpo/internvl3_{size}.yaml").read_text())
    assert set(recipe) <= mpo_fields(), set(recipe) - mpo_fields()
    lr, max_len, zero = PUBLISHED[size]
    assert recipe["learning_rate"] == lr and recipe["max_length"] == max_len
    assert recipe["deepspeed"] == f"recipes/mpo/{zero}" and (ROOT / recipe["deepspeed"]).is_file()
    assert recipe["loss_type"] == ["sigmoid", "bco_pair", "sft"] and recipe["loss_weights"] == [0.8, 0.2, 1.0]
    assert recipe["weight_decay"] == 0.05 and recipe["warmup_steps"] == 0.03 and recipe["max_dynamic_patch"] == 12


def test_tiny_recipe_keys():
    recipe = yaml.safe_load((ROOT / "recipes/mpo/tiny.yaml").read_text())
    assert set(recipe) <= mpo_fields()
    assert (ROOT / recipe["data"]).is_file()


def test_trl_version_pinned():
    import trl

    assert trl.__version__.startswith("1.16."), "MPOTrainer overrides trl 1.16 internals; re-check them first"


def test_overridden_trl_internals_exist():
    """The DPOTrainer methods MPOTrainer overrides or calls, with the signatures it relies on."""
    from trl import DPOTrainer

    expected = {
        "_compute_loss": ["self", "model", "inputs", "return_outputs"],
        "compute_ref_log_probs": ["self", "model", "inputs"],
        "_prepare_dataset": ["self", "dataset", "processing_class", "args", "dataset_name"],
        "_set_signature_columns_if_needed": ["self"],
        "_send_telemetry": ["self"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(DPOTrainer, name)).parameters) == params, name
    source = inspect.getsource(DPOTrainer.__init__)
    for attribute in ("self.loss_types", "self.loss_weights", "self.beta", "self.precompute_ref_logps",
                      "self._metrics"):
        assert attribute in inspect.getsource(DPOTrainer), attribute
    assert "add_fused_lm_head" in source


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_internvl3_recipes_start_like_the_released_runs(size):
    # The released InternVL3 MPO runs start from InternVL3-*-Instruct (the SFT checkpoint; InternVL3-* without the
    # suffix is the model after MPO), build every sample with the internvl2_5 template's default system message and
    # train with drop_path_rate 0.1 on the vision tower.
    from rlhf.processing import INTERNVL_SYSTEM_PROMPT, resolve_system_prompt

    recipe = yaml.safe_load((ROOT / f"recipes/mpo/internvl3_{size}.yaml").read_text())
    assert recipe["model_name_or_path"] == f"checkpoints/InternVL3-{size.upper()}-Instruct-hf"  # converted locally
    assert resolve_system_prompt(recipe["system_prompt"]) == INTERNVL_SYSTEM_PROMPT
    assert recipe["drop_path"] == 0.1
