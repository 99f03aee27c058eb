"""edgert's kernels built for the device (GPU 0; llvm in the CPU dry run) against their NumPy
references: tree attention (several trees, prefixes 0 .. 700, two schedules), kv-append,
kv-commit (the device cache's Medusa commit, all layers' buffers), DHSA boundaries and DHSA
attention (the artifact's DHSA parameters, dynamic and fixed chunks). Each test records its
error in the session's record (``kernels``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.gpu.checks import (
    ATOL,
    KV_APPEND_CASES,
    KV_COMMIT_PATHS,
    PREFIXES,
    TREES,
    KernelBuilder,
)

pytestmark = pytest.mark.gpu

SCHEDULES = ("default", "grouped")  # the default knobs; a KV group's heads together, tiles of 8
DHSA_LENGTHS = ("budget+300", "2budget+77")


@pytest.fixture(scope="module")
def kernels(gpu_device) -> KernelBuilder:
    return KernelBuilder(gpu_device)


@pytest.fixture(scope="module")
def dims(manifest) -> tuple[int, int, int]:
    config = manifest.config
    return config.num_attention_heads, config.num_key_value_heads, config.head_dim


@pytest.fixture(scope="module")
def dhsa_params(manifest):
    from edgert.dhsa.params import DHSAParams

    params = DHSAParams.from_manifest(manifest)
    if params is None:
        pytest.skip("the artifact has no DHSA parameters (exported without --dhsa)")
    return params


def dhsa_length(params, name: str) -> int:
    return {"budget+300": params.budget + 300, "2budget+77": 2 * params.budget + 77}[name]


# -- tree attention and kv-append --------------------------------------------------------------
@pytest.mark.parametrize("past", PREFIXES, ids=lambda p: f"past{p}")
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tree_attention(kernels, dims, gpu_record, schedule, tree, past):
    from edgert.medusa.tree_order import tree_order_from_parents
    from edgert.passes.tir.tree_attention import (
        TreeAttentionKnobs,
        tree_attention_reference,
        tree_attention_tir,
    )

    hq, hkv, d = dims
    knobs = TreeAttentionKnobs() if schedule == "default" else TreeAttentionKnobs(hq // hkv, 8, 1)
    kernel = kernels.build("edgert_tree_attention", (knobs,),
                           lambda: tree_attention_tir(hq, hkv, d, kernels.device.gpu, knobs))
    parents = TREES[tree]
    rng = np.random.default_rng(len(parents) * 1000 + past)
    n, cap = len(parents), past + len(parents) + 5
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    kc = rng.standard_normal((hkv, cap, d)).astype(np.float32)
    vc = rng.standard_normal((hkv, cap, d)).astype(np.float32)
    order = tree_order_from_parents(np.array(parents))
    out = kernels.tensor(np.zeros((n, hq, d), np.float32))
    kernel(kernels.tensor(q), kernels.tensor(kc), kernels.tensor(vc), kernels.tensor(order), past,
           out)
    error = float(np.abs(out.numpy() - tree_attention_reference(q, kc, vc, order, past)).max())
    gpu_record.kernel_error("tree_attention", f"{tree}, past {past}, {knobs}", error, ATOL)
    assert error <= ATOL, f"tree attention ({tree}, past {past}, {knobs}): max error {error}"


@pytest.mark.parametrize("past,n", KV_APPEND_CASES, ids=lambda v: str(v))
def test_kv_append(kernels, dims, gpu_record, past, n):
    from edgert.passes.tir.tree_attention import kv_append_tir

    _, hkv, d = dims
    kernel = kernels.build("edgert_kv_append", (),
                           lambda: kv_append_tir(hkv, d, kernels.device.gpu))
    rng = np.random.default_rng(past + n)
    before = rng.standard_normal((hkv, 1024, d)).astype(np.float32)
    new = rng.standard_normal((n, hkv, d)).astype(np.float32)
    cache = kernels.tensor(before)
    kernel(cache, kernels.tensor(new), past)
    want = before.copy()
    want[:, past:past + n] = new.transpose(1, 0, 2)
    error = float(np.abs(cache.numpy() - want).max())
    gpu_record.kernel_error("kv_append", f"past {past}, {n} new", error, 0.0)
    assert error == 0.0, f"kv-append (past {past}, {n} new) is not an exact copy: {error}"


def test_kv_commit(kernels, manifest, gpu_record):
    """The device cache (all layers' buffers, one launch) against the NumPy cache."""
    from edgert.passes.tir.kv_commit import build_kv_commit
    from edgert.runtime.device_kv_cache import DeviceKVCache
    from edgert.runtime.kv_cache import KVCache

    spec = dataclasses.replace(manifest.kv_cache, capacity=96)
    host = KVCache(spec)
    rng = np.random.default_rng(0)
    host.storage[...] = rng.standard_normal(host.storage.shape)
    device = DeviceKVCache(spec, kernels.device.dev, build_kv_commit(spec, kernels.device.target))
    for i, tensor in enumerate(device.tensors()):
        tensor.copyfrom(np.ascontiguousarray(host.storage[i // 2, i % 2, 0]))
    worst, steps = 0.0, 0
    while host.length + 8 <= host.capacity:
        offsets = np.array(KV_COMMIT_PATHS[steps % len(KV_COMMIT_PATHS)])
        host.commit_path(offsets)
        device.commit_path(offsets)
        worst = max(worst, float(np.abs(device.to_numpy() - host.storage).max()))
        steps += 1
    gpu_record.kernel_error("kv_commit", f"{steps} commits", worst, 0.0)
    gpu_record.data["kernels"]["kv_commit"].update(commits=steps, buffers=2 * spec.num_layers)
    assert steps > 0
    assert worst == 0.0, f"kv-commit: the device cache differs from the NumPy one by {worst}"


# -- DHSA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixed", [0, 100], ids=lambda f: f"fixed{f}")
@pytest.mark.parametrize("length", DHSA_LENGTHS)
@pytest.mark.parametrize("threshold", ["artifact", 1.1], ids=lambda t: f"threshold-{t}")
def test_dhsa_boundaries(kernels, dims, dhsa_params, gpu_record, threshold, length, fixed):
    from edgert.dhsa import reference
    from edgert.passes.tir.dhsa_boundaries import dhsa_boundaries_tir

    hq, hkv, d = dims
    value = dhsa_params.boundary_threshold if threshold == "artifact" else threshold
    params = dataclasses.replace(dhsa_params, boundary_threshold=value)
    kernel = kernels.build("edgert_dhsa_boundaries", (value,),
                           lambda: dhsa_boundaries_tir(hq, hkv, d, params, kernels.device.gpu))
    seq_len = dhsa_length(params, length)
    rng = np.random.default_rng(seq_len + fixed)
    q = rng.standard_normal((seq_len, hq, d)).astype(np.float32)
    k = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
    out = kernels.tensor(np.full(seq_len, 7, np.int32))
    kernel(kernels.tensor(q), kernels.tensor(k), fixed, out)
    ref = dataclasses.replace(params, fixed_chunk=fixed)
    want = reference.chunk_starts(
        reference.boundary_ratios(q.transpose(1, 0, 2), k.transpose(1, 0, 2), ref), ref)
    mismatches = int((out.numpy() != want).sum())
    gpu_record.kernel_mismatches("dhsa_boundaries",
                                 f"threshold {value}, {seq_len} tokens, fixed {fixed}",
                                 mismatches)
    assert mismatches == 0, f"DHSA boundaries: {mismatches} of {seq_len} chunk starts differ"


@pytest.mark.parametrize("chunks", ["random", "fixed"])
@pytest.mark.parametrize("length", DHSA_LENGTHS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dhsa_attention(kernels, dims, dhsa_params, gpu_record, schedule, length, chunks):
    from edgert.dhsa import reference
    from edgert.passes.tir.dhsa_attention import DHSAKnobs, dhsa_attention_tir

    hq, hkv, d = dims
    params = dhsa_params
    knobs = DHSAKnobs() if schedule == "default" else DHSAKnobs(hq // hkv, 8)
    kernel = kernels.build(
        "edgert_dhsa_attention", (knobs,),
        lambda: dhsa_attention_tir(hq, hkv, d, params, kernels.device.gpu, knobs))
    seq_len = dhsa_length(params, length)
    rng = np.random.default_rng(seq_len)
    q = rng.standard_normal((seq_len, hq, d)).astype(np.float32)
    k = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
    v = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
    if chunks == "random":
        starts = rng.random(seq_len) < 0.02
    else:
        starts = np.arange(seq_len) % 64 == 0
    starts[0] = True
    out = kernels.tensor(np.zeros(q.shape, np.float32))
    kernel(kernels.tensor(q), kernels.tensor(k), kernels.tensor(v),
           kernels.tensor(starts.astype(np.int32)), out)
    qh, kh, vh = (a.transpose(1, 0, 2) for a in (q, k, v))
    selection = reference.select_keys(reference.token_scores(qh, kh, starts, params), seq_len,
                                      params)
    want = reference.sparse_attention(qh, kh, vh, selection, params).transpose(1, 0, 2)
    error = float(np.abs(out.numpy() - want).max())
    gpu_record.kernel_error("dhsa_attention", f"{seq_len} tokens, {chunks} chunks, {knobs}",
                            error, ATOL)
    assert error <= ATOL, f"DHSA attention ({seq_len} tokens, {chunks} chunks, {knobs}): " \
                          f"max error {error}"
