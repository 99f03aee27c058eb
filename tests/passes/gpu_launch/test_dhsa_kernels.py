"""DHSA boundaries and DHSA attention as TVM generates them for opencl, opencl -device=adreno and
webgpu, executed against the NumPy reference (edgert.dhsa.reference): prompt lengths that are
and are not whole blocks, dynamic and fixed chunks, equal scores (ties to the lower index)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgert.passes.tir.dhsa_attention import DHSAKnobs, dhsa_attention_tir
from edgert.passes.tir.dhsa_boundaries import dhsa_boundaries_tir
from tests.passes.tir import test_dhsa_attention as attention
from tests.passes.tir import test_dhsa_boundaries as boundaries

ATOL = 1e-5
THRESHOLDS = [2.0, 1.1]  # the small parameters' own, and one with many boundaries
KNOBS = [DHSAKnobs(), DHSAKnobs(2, 8), DHSAKnobs(1, 3)]


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_dhsa_boundaries(gpu, threshold):
    params = dataclasses.replace(boundaries.SMALL, boundary_threshold=threshold)
    built = gpu.build(("dhsa_boundaries", threshold), lambda: dhsa_boundaries_tir(
        boundaries.HQ, boundaries.HKV, boundaries.D, params, gpu=True,
        index_dtype=gpu.index_dtype))
    for seq_len, fixed in ((5, 0), (20, 0), (48, 0), (150, 0), (301, 0), (150, 10), (20, 64)):
        q, k = boundaries.random_qk(seq_len, seed=seq_len)
        out = gpu.run(built, [q, k, fixed, np.full(seq_len, 7, np.int32)])
        np.testing.assert_array_equal(
            out["starts"], boundaries.reference_starts(q, k, params, fixed),
            err_msg=f"{gpu.name}: threshold {threshold}, {seq_len} tokens, fixed {fixed}")


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
def test_dhsa_attention(gpu, knobs):
    built = gpu.build(("dhsa_attention", knobs), lambda: dhsa_attention_tir(
        attention.HQ, attention.HKV, attention.D, attention.SMALL, gpu=True, knobs=knobs,
        index_dtype=gpu.index_dtype))
    for seq_len, chunks in ((20, "random"), (64, "fixed"), (150, "random"), (301, "fixed"),
                            (120, "ties")):
        q, k, v = attention.random_qkv(seq_len, seed=seq_len)
        if chunks == "random":
            starts = attention.random_starts(seq_len, seq_len)
        else:
            starts = attention.fixed_starts(seq_len, every=5 if chunks == "ties" else 12)
        if chunks == "ties":  # every chunk scores 0: the earliest free keys win
            k = np.zeros_like(k)
        out = gpu.run(built, [q, k, v, starts.astype(np.int32), np.zeros_like(q)])
        np.testing.assert_allclose(
            out["out"], attention.reference_output(q, k, v, starts, attention.SMALL),
            atol=ATOL, err_msg=f"{gpu.name} {knobs}: {seq_len} tokens, {chunks} chunks")
