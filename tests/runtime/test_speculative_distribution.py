"""Speculative sampling end to end on the tiny model: the first two tokens a sampled request
emits, over many seeds, follow the backbone's filtered distribution (temperature, top_k,
top_p), checked by a chi-square test at significance 0.001.

The drafter is prompt lookup made to propose, every step, the token that is most often the
backbone's second token: it is accepted in a good share of the runs, rejected in the rest,
so both branches of rejection acceptance shape the sample. The expected distribution of
(first, second) is exact: p(t1) from the prompt's logits, p(t2 | t1) from the prompt + t1's,
each filtered as the request asks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgert.runtime.sampling import SamplingParams, probabilities
from edgert.speculative import lookup

PROMPT = "Explain loops"
RUNS = 1500
SIGNIFICANCE = 0.001
Z_UPPER = 3.090232  # the standard normal's upper 0.001 quantile


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty: the chi-square distribution's upper ``SIGNIFICANCE`` quantile with
    ``df`` degrees of freedom (within 1% of the exact value for df >= 3)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + Z_UPPER * math.sqrt(h)) ** 3


def exact_pairs(engine, prompt_ids: list[int], params: SamplingParams) -> dict:
    engine.reset()
    first = probabilities(engine.prefill_ids(prompt_ids).logits[-1], params)
    pairs = {}
    for t1 in np.flatnonzero(first):
        engine.reset()
        second = probabilities(engine.prefill_ids([*prompt_ids, int(t1)]).logits[-1], params)
        for t2 in np.flatnonzero(second):
            pairs[(int(t1), int(t2))] = first[t1] * second[t2]
    engine.reset()
    return pairs


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=4),
                                    SamplingParams(temperature=0.7, top_k=6, top_p=0.8)],
                         ids=str)
def test_speculative_sampling_follows_the_filtered_distribution(tiny_engine, monkeypatch,
                                                                 params):
    engine = tiny_engine
    prompt_ids = engine.encode(PROMPT)
    expected = exact_pairs(engine, prompt_ids, params)
    marginal: dict[int, float] = {}
    for (_, t2), p in expected.items():
        marginal[t2] = marginal.get(t2, 0.0) + p
    draft = max(marginal, key=marginal.get)
    monkeypatch.setattr(lookup.PromptLookup, "propose", lambda self: [draft])
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for seed in range(RUNS):
        result = engine.generate(PROMPT, max_new_tokens=2, temperature=params.temperature,
                                 top_k=params.top_k, top_p=params.top_p, seed=seed,
                                 speculative="lookup", ignore_eos=True)
        pair = tuple(result.output_ids[:2])
        counts[pair] = counts.get(pair, 0) + 1
        accepted += result.stats["accepted_by"]["lookup"]
    assert set(counts) <= set(expected), "a pair outside the filtered support was emitted"
    assert 0.1 * RUNS < accepted < 0.9 * RUNS  # drafts accepted and rejected alike
    # chi-square over the pairs, the rare ones pooled (expected counts >= 5 per cell)
    cells = sorted(expected, key=expected.get, reverse=True)
    observed, wanted, pool_obs, pool_exp = [], [], 0, 0.0
    for pair in cells:
        e = expected[pair] * RUNS
        if e >= 5:
            observed.append(counts.get(pair, 0))
            wanted.append(e)
        else:
            pool_obs += counts.get(pair, 0)
            pool_exp += e
    if pool_exp > 0:
        observed.append(pool_obs)
        wanted.append(pool_exp)
    statistic = sum((o - w) ** 2 / w for o, w in zip(observed, wanted))
    df = len(observed) - 1
    assert df >= 3
    assert statistic < chi2_critical(df), (statistic, df)
