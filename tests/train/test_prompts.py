"""The shipped self-distillation prompts: the held-out split never leaks into either training
set, and the wide set only adds training-only topics to the base one."""

from __future__ import annotations

import pytest

from edgert.train import prompts as P


@pytest.mark.parametrize("per_topic", [3, 8])
def test_wide_set_extends_the_base_set_without_held_out_prompts(per_topic):
    base = P.training_prompts(per_topic)
    wide = P.training_prompts(per_topic, "wide")
    held = set(P.heldout_prompts())
    assert set(base) < set(wide)
    assert len(wide) > 2 * len(base)
    assert not held & set(wide)


def test_wide_topics_are_new_and_the_held_out_split_is_unchanged():
    assert not set(P.WIDE_TOPICS) & set(P.TOPICS)
    assert not set(P.WIDE_CODE_TOPICS) & set(P.CODE_TOPICS)
    assert len(P.heldout_prompts()) == 53  # eval-heads / eval-draft records count these


def test_unknown_prompt_set_is_refused():
    with pytest.raises(ValueError, match="prompt set"):
        P.training_prompts(3, "huge")
