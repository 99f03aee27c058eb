"""Prompt lookup candidates on constructed texts, against a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.speculative.lookup import LookupParams, PromptLookup


def brute_force(text: list[int], params: LookupParams) -> list[int]:
    """Longest suffix (max_ngram down to min_ngram) with an earlier occurrence; the tokens
    after its latest one."""
    for n in range(params.max_ngram, params.min_ngram - 1, -1):
        if len(text) < n:
            continue
        suffix = text[len(text) - n:]
        for start in range(len(text) - n - 1, -1, -1):
            if text[start:start + n] == suffix:
                return text[start + n:start + n + params.num_tokens]
    return []


def test_copy_from_the_prompt():
    lookup = PromptLookup(LookupParams(max_ngram=3, num_tokens=4))
    lookup.reset([10, 11, 12, 13, 14, 15, 16, 99, 11, 12])
    assert lookup.propose() == [13, 14, 15, 16]  # "11 12" was followed by 13 14 15 16
    lookup.extend([13])
    assert lookup.propose() == [14, 15, 16, 99]  # the 3-gram "11 12 13" now


def test_the_longest_suffix_wins_then_the_latest_occurrence():
    lookup = PromptLookup(LookupParams(max_ngram=2, min_ngram=1, num_tokens=2))
    lookup.reset([1, 2, 7, 3, 2, 8, 1, 2])
    # 2-gram "1 2" occurred at 0 (followed by 7 3); 1-gram "2" latest at 4 (followed by 8 1)
    assert lookup.propose() == [7, 3]
    lookup.reset([5, 2, 7, 3, 2, 8, 6, 2])
    assert lookup.propose() == [8, 6]  # no earlier "6 2": the latest "2"


def test_nothing_repeated_proposes_nothing():
    lookup = PromptLookup(LookupParams(min_ngram=2))
    lookup.reset([1, 2, 3, 4, 1])
    assert lookup.propose() == []  # only a 1-gram repeats


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_as_the_text_grows(seed):
    rng = np.random.default_rng(seed)
    params = LookupParams(max_ngram=3, min_ngram=1, num_tokens=5)
    text = rng.integers(0, 6, 40).tolist()  # a small alphabet: many repeats
    lookup = PromptLookup(params)
    lookup.reset(text[:5])
    for end in range(5, len(text) + 1):
        assert lookup.propose() == brute_force(text[:end], params), end
        if end < len(text):
            lookup.extend([text[end]])


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        LookupParams(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="num_tokens"):
        LookupParams(num_tokens=0)
