"""The device-resident KV cache (TVM buffers + the compiled commit kernel) against the NumPy
KVCache: same contents after the same commits, same bookkeeping and errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgert.artifact.manifest import KVCacheSpec
from edgert.errors import CapacityError
from edgert.runtime.kv_cache import KVCache

tvm = pytest.importorskip("tvm")

from edgert.passes.tir.kv_commit import (  # noqa: E402
    FUNCTION,
    _gpu_split,
    build_kv_commit_library,
    kv_commit_module,
    kv_commit_reference,
)
from edgert.runtime.device_kv_cache import DeviceKVCache  # noqa: E402

SPEC = KVCacheSpec(capacity=24, num_layers=3, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def commit_lib():
    return build_kv_commit_library(SPEC, "llvm")


def twin_caches(commit_lib, seed=0, spec=SPEC):
    """A NumPy cache and a device cache (on tvm.cpu()) holding the same random contents."""
    host = KVCache(spec)
    host.storage[...] = np.random.default_rng(seed).standard_normal(host.storage.shape)
    device = DeviceKVCache(spec, tvm.cpu(), commit_lib)
    for i, tensor in enumerate(device.tensors()):
        tensor.copyfrom(np.ascontiguousarray(host.storage[i // 2, i % 2, 0]))
    np.testing.assert_array_equal(device.to_numpy(), host.storage)
    return host, device


def test_allocated_once_per_layer_buffer(commit_lib):
    cache = DeviceKVCache(SPEC, tvm.cpu(), commit_lib)
    tensors = cache.tensors()
    assert len(tensors) == 2 * SPEC.num_layers
    assert all(tuple(t.shape) == (2, 24, 8) and str(t.dtype) == "float32" for t in tensors)
    assert len({t.data_ptr for t in tensors}) == len(tensors)
    assert cache.nbytes == SPEC.bytes and cache.capacity == 24
    assert not cache.to_numpy().any()  # zeroed at load
    cache.length = 10
    cache.commit_path(np.array([0, 2]))
    assert [t.data_ptr for t in cache.tensors()] == [t.data_ptr for t in tensors]  # in place


@pytest.mark.parametrize("length, offsets", [
    (4, [0, 2, 5]),
    (0, [0, 1, 3]),          # empty prefix
    (7, [0, 1, 2, 3]),       # identity: nothing moves
    (7, [0]),                # the root alone
    (3, [1, 2, 6, 7, 11]),   # first entry moves too; overlapping source and destination
    (5, [0, 3, 4, 5, 8]),    # destination of a row is the source of a later one
    (18, [0, 2, 5]),         # the last entry of the capacity is a source
    (0, list(range(24))),    # the whole capacity, identity
    (20, [0, 1, 3]),         # the last entry of the capacity is written
])
def test_commit_matches_numpy(commit_lib, length, offsets):
    host, device = twin_caches(commit_lib, seed=length + len(offsets))
    for cache in (host, device):
        cache.length = length
        cache.commit_path(np.array(offsets))
    assert device.length == host.length == length + len(offsets)
    np.testing.assert_array_equal(device.to_numpy(), host.storage)


def test_random_commit_sequences_match_numpy(commit_lib):
    """Medusa-like steps: a tree written after the prefix, a random accepted path kept."""
    rng = np.random.default_rng(1)
    host, device = twin_caches(commit_lib, seed=1)
    while host.length + 6 <= host.capacity:
        tree = rng.standard_normal((SPEC.num_layers, 2, 1, 2, 6, 8)).astype(np.float32)
        host.storage[..., host.length:host.length + 6, :] = tree
        for i, tensor in enumerate(device.tensors()):
            tensor.copyfrom(np.ascontiguousarray(host.storage[i // 2, i % 2, 0]))
        path = np.sort(rng.choice(np.arange(1, 6), rng.integers(0, 4), replace=False))
        offsets = np.concatenate([[0], path])
        host.commit_path(offsets)
        device.commit_path(offsets)
        assert device.length == host.length
        np.testing.assert_array_equal(device.to_numpy(), host.storage)


def test_errors_and_bookkeeping_match_numpy(commit_lib):
    host, device = twin_caches(commit_lib)
    for cache in (host, device):
        cache.advance(20)
        with pytest.raises(CapacityError, match="KV capacity 24"):
            cache.advance(5)
        with pytest.raises(CapacityError):
            cache.commit_path(np.array([0, 4]))  # offset 4 lies at position 24, outside
        with pytest.raises(ValueError, match="ascending"):
            cache.commit_path(np.array([0, 2, 1]))
        assert cache.length == 20
        cache.reset()
        assert cache.length == 0
    np.testing.assert_array_equal(device.to_numpy(), host.storage)


def test_kernel_against_reference_float16():
    spec = KVCacheSpec(capacity=16, num_layers=1, num_kv_heads=3, head_dim=4, dtype="float16")
    lib = build_kv_commit_library(spec, "llvm")
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((3, 16, 4)).astype(np.float16) for _ in range(2)]
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    offsets = np.array([0, 2, 3, 6])
    lib[FUNCTION](*tensors, tvm.runtime.tensor(offsets), 5)
    kv_commit_reference(arrays, offsets, 5)
    for a, t in zip(arrays, tensors):
        np.testing.assert_array_equal(t.numpy(), a)


@pytest.mark.parametrize("lanes, parts, threads", [(16, 1, 16), (192, 1, 192),
                                                   (2048, 2, 1024), (3 * 1000, 3, 1000)])
def test_gpu_mapping_splits_wide_buffers(lanes, parts, threads):
    assert _gpu_split(lanes) == (parts, threads)


def test_gpu_mapping_builds_for_cuda():
    """One kernel for all the buffers (one launch per commit), each thread walking the entries
    in order; run on a GPU by tests/gpu (scripts/gpu_check.sh)."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    lib = tvm.tirx.build(kv_commit_module(6, 2, 8, gpu=True), target)
    source = lib.imports[0].inspect_source()
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)", source))
    assert kernels == {"edgert_kv_commit_kernel"}
    assert "blockIdx.x" in source and "threadIdx.x" in source
