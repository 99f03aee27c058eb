from __future__ import annotations

import numpy as np
import pytest

from edgert.runtime.sampling import SamplingParams, probabilities, select_token


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert select_token(logits, SamplingParams(), np.random.default_rng(0)) == 1


def test_temperature_only_is_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    np.testing.assert_allclose(probabilities(logits, SamplingParams(temperature=0.5)),
                               softmax(logits / 0.5), rtol=1e-12)


def test_top_k_keeps_k_largest():
    logits = np.array([1.0, 4.0, 3.0, 2.0, 0.0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = np.zeros(5)
    expected[[1, 2]] = softmax(np.array([4.0, 3.0]))
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    p = probabilities(np.log(probs), SamplingParams(temperature=1.0, top_p=0.75))
    # 0.5 < 0.75, 0.5+0.3 >= 0.75: keep the first two
    np.testing.assert_allclose(p, [0.5 / 0.8, 0.3 / 0.8, 0, 0], rtol=1e-12)


def test_sampling_follows_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    rng = np.random.default_rng(0)
    draws = [select_token(logits, SamplingParams(temperature=1.0), rng) for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0}, {"top_k": 1.5}])
def test_invalid_params(kwargs):
    from edgert.errors import GenerationError

    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)


def _full_sort_nucleus(probs, top_p):
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    return order[cumulative - probs[order] < top_p]


@pytest.mark.parametrize("seed", range(40))
def test_nucleus_picks_what_a_full_sort_picks(seed):
    """The partial sort gives the full stable sort's set, ties included (rounded logits make
    many), on small and vocabulary-sized rows."""
    from edgert.runtime.sampling import nucleus

    rng = np.random.default_rng(seed)
    v = [7, 100, 5000][seed % 3]
    logits = rng.normal(size=v) * [0.1, 1.0, 6.0][seed % 3]
    if seed % 2:
        logits = np.round(logits, 1)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    for top_p in (0.01, 0.5, 0.9, 0.999):
        np.testing.assert_array_equal(np.sort(nucleus(probs, top_p)),
                                      np.sort(_full_sort_nucleus(probs, top_p)))
