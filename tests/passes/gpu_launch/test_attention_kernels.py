"""Tree attention (and its masked form, the draft layer's), KV append and KV commit as TVM
generates them for opencl, opencl -device=adreno and webgpu, executed (PoCL, wgpu/lavapipe)
against their NumPy references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgert.medusa.tree_order import tree_order_from_parents
from edgert.passes.tir.kv_commit import FUNCTION as KV_COMMIT
from edgert.passes.tir.kv_commit import kv_commit_reference, kv_commit_tir
from edgert.passes.tir.tree_attention import (
    TreeAttentionKnobs,
    kv_append_tir,
    masked_attention_reference,
    tree_attention_reference,
    tree_attention_tir,
)
from tests.gpu.checks import KV_COMMIT_PATHS, TREES

HQ, HKV, D = 4, 2, 8
ATOL = 1e-5
PASTS = (0, 1, 37)
# the untuned schedule, a KV group's heads together with key tiles and vector lanes, tiles
# that do not divide the key count; Gemma 2's soft-capped scores
SCHEDULES = {"default": (TreeAttentionKnobs(), 0.0), "grouped": (TreeAttentionKnobs(2, 8, 8), 0.0),
             "odd-tiles": (TreeAttentionKnobs(1, 3, 4), 0.0),
             "softcap": (TreeAttentionKnobs(2, 1, 1), 5.0)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_tree_attention(gpu, schedule):
    knobs, softcap = SCHEDULES[schedule]
    built = gpu.build(("tree_attention", knobs, softcap), lambda: tree_attention_tir(
        HQ, HKV, D, gpu=True, knobs=knobs, softcap=softcap))
    for (tree, parents), past in ((t, p) for t in TREES.items() for p in PASTS):
        rng = np.random.default_rng(len(parents) * 100 + past)
        n, cap = len(parents), past + len(parents) + 5
        q = rng.standard_normal((n, HQ, D)).astype(np.float32)
        kc, vc = (rng.standard_normal((HKV, cap, D)).astype(np.float32) for _ in range(2))
        order = tree_order_from_parents(np.array(parents))
        out = gpu.run(built, [q, kc, vc, order, past, np.zeros((n, HQ, D), np.float32)])
        want = tree_attention_reference(q, kc, vc, order, past, softcap)
        np.testing.assert_allclose(out["out"], want, atol=ATOL,
                                   err_msg=f"{gpu.name} {schedule}: tree {tree}, past {past}")


@pytest.mark.parametrize("schedule", ["default", "grouped"])
def test_masked_attention(gpu, schedule):
    """The draft layer's kernel: 0 / -1e9 mask rows over the new rows or the whole cache."""
    knobs, _ = SCHEDULES[schedule]
    built = gpu.build(("masked_attention", knobs), lambda: tree_attention_tir(
        HQ, HKV, D, gpu=True, knobs=knobs, mask="visibility"))
    for n, past, whole in ((1, 0, False), (4, 37, False), (3, 9, True)):
        rng = np.random.default_rng(n * 100 + past)
        cap = past + n + 5
        q = rng.standard_normal((n, HQ, D)).astype(np.float32)
        kc, vc = (rng.standard_normal((HKV, cap, D)).astype(np.float32) for _ in range(2))
        w = past + n if whole else n
        mask = np.where(rng.random((n, w)) < 0.5, -1e9, 0).astype(np.float32)
        mask[np.arange(n), w - n + np.arange(n)] = 0
        out = gpu.run(built, [q, kc, vc, mask, past, np.zeros((n, HQ, D), np.float32)],
                      "edgert_masked_attention")
        np.testing.assert_allclose(out["out"], masked_attention_reference(q, kc, vc, mask, past),
                                   atol=ATOL, err_msg=f"{gpu.name} {schedule}: n {n}, w {w}")


@pytest.mark.parametrize("past, n", [(0, 1), (0, 37), (5, 3), (60, 4)])
def test_kv_append(gpu, past, n):
    built = gpu.build(("kv_append",), lambda: kv_append_tir(HKV, D, gpu=True))
    rng = np.random.default_rng(past + n)
    before = rng.standard_normal((HKV, 64, D)).astype(np.float32)
    new = rng.standard_normal((n, HKV, D)).astype(np.float32)
    want = before.copy()
    want[:, past:past + n] = new.transpose(1, 0, 2)
    out = gpu.run(built, [before, new, past])
    np.testing.assert_array_equal(out["cache"], want)


@pytest.mark.parametrize("buffers", [2, 6])
def test_kv_commit(gpu, buffers):
    """Every accepted path of the GPU suite, committed after 0 and 9 entries, in one launch
    over all buffers (overlapping moves run forward)."""
    built = gpu.build(("kv_commit", buffers), lambda: kv_commit_tir(
        buffers, HKV, D, gpu=True, index_dtype=gpu.index_dtype))
    rng = np.random.default_rng(buffers)
    for path, length in ((p, n) for p in KV_COMMIT_PATHS for n in (0, 9)):
        caches = [rng.standard_normal((HKV, 24, D)).astype(np.float32) for _ in range(buffers)]
        want = [c.copy() for c in caches]
        kv_commit_reference(want, np.array(path), length)
        out = gpu.run(built, [*caches, np.array(path, gpu.index_dtype), length], KV_COMMIT)
        for b, expected in enumerate(want):
            np.testing.assert_array_equal(out[f"arg{b}"], expected,
                                          err_msg=f"{gpu.name}: path {path}, length {length}")


def test_schedules_differ():
    """The schedules above are distinct kernels (a guard against a knob silently ignored)."""
    assert len({dataclasses.astuple(k) + (c,) for k, c in SCHEDULES.values()}) == len(SCHEDULES)
