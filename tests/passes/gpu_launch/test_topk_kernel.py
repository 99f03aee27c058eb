"""edgert's top-k as TVM generates it for opencl, opencl -device=adreno and webgpu, executed
against the NumPy reference: ties (the lower index first), rows of -inf, rows shorter than the
lanes and rows that do not divide them."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.passes.tir.topk import topk_reference, topk_tir

# (k, lanes): 256 lanes (the GPU default: more lanes than a short row has), odd and
# power-of-two lane counts
SETTINGS = [(1, None), (4, None), (4, 7), (10, 32), (10, 7)]


def rows(v: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((6, v)).astype(np.float32)
    x[1, v // 10:v // 10 + 20] = 4.0  # ties: the lower indices first
    x[2] = -np.inf  # nothing but -inf: indices 0..k-1
    x[3, ::7] = 9.0  # ties spread over the lanes
    x[4, -1] = 50.0  # the row's last element (a tail lane) wins
    return x


@pytest.mark.parametrize("k, lanes", SETTINGS, ids=lambda v: str(v))
def test_topk(gpu, k, lanes):
    built = gpu.build(("topk", k, lanes), lambda: topk_tir(
        k, gpu=True, index_dtype=gpu.index_dtype, lanes=lanes))
    for v in (12, 101, 5000):
        x = rows(v, seed=v)
        out = gpu.run(built, [x, np.zeros((6, k), np.float32), np.zeros((6, k), gpu.index_dtype)])
        want_values, want_indices = topk_reference(x, k)
        np.testing.assert_array_equal(out["indices"], want_indices,
                                      err_msg=f"{gpu.name} k={k} lanes={lanes} V={v}")
        np.testing.assert_array_equal(out["values"], want_values)
