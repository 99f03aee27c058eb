"""bench.speculative's mode labels: MODE, MODE@DEPTH, MODE@DEPTH.BEAM.TOPK.BUDGET."""

from __future__ import annotations

import pytest

from bench.speculative import split_mode


def test_mode_labels():
    assert split_mode("draft+lookup") == ("draft+lookup", None)
    assert split_mode("draft@2") == ("draft", (2,))
    assert split_mode("draft+lookup@1.2.2.6") == ("draft+lookup", (1, 2, 2, 6))


@pytest.mark.parametrize("label", ["draft@0", "draft@x", "draft@1.2", "draft@1.2.3.0"])
def test_bad_labels_are_refused(label):
    with pytest.raises(SystemExit, match="after '@'"):
        split_mode(label)
