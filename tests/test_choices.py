"""rlhf.choices: one OverflowAction, and the members each job accepts."""

import pytest

from reward.prm_config import PRMConfigError, VisualPRMConfig
from rlhf.choices import PRM_OVERFLOW, ROW_OVERFLOW, OverflowAction
from rlhf.mpo_config import MPOConfig


def test_overflow_action_is_the_union_and_each_job_takes_its_members(tmp_path):
    assert [a.value for a in OverflowAction] == ["skip", "error", "reject", "truncate"]
    assert [a.value for a in ROW_OVERFLOW] == ["skip", "error", "reject"]  # a preference prompt is never cut
    assert [a.value for a in PRM_OVERFLOW] == ["truncate", "skip", "error"]  # PRM data have no rejects file
    assert MPOConfig(output_dir=str(tmp_path), on_overflow="reject").on_overflow == "reject"
    with pytest.raises(ValueError, match="'truncate' is not a valid OverflowAction"):
        MPOConfig(output_dir=str(tmp_path), on_overflow="truncate")
    assert VisualPRMConfig(output_dir=str(tmp_path), on_overflow="truncate").on_overflow == "truncate"
    with pytest.raises(PRMConfigError, match="on_overflow must be one of 'truncate', 'skip', 'error', got 'reject'"):
        VisualPRMConfig(output_dir=str(tmp_path), on_overflow="reject")


def test_parse_choice_gives_the_member_or_one_line_listing_the_choices():
    from enum import StrEnum

    from rlhf.choices import parse_choice
    from rlhf.errors import UserError

    class Colour(StrEnum):
        RED = "red"
        BLUE = "blue"

    assert parse_choice(Colour, "blue", "colour") is Colour.BLUE
    assert parse_choice(Colour, Colour.RED, "colour") is Colour.RED
    with pytest.raises(ValueError, match=r"^colour must be one of red, blue, got 'green'$"):
        parse_choice(Colour, "green", "colour")
    with pytest.raises(UserError, match=r"^colour must be one of red, blue, got None$"):
        parse_choice(Colour, None, "colour", UserError)
