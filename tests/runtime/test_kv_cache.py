from __future__ import annotations

import numpy as np
import pytest

from edgert.artifact.manifest import KVCacheSpec
from edgert.errors import CapacityError
from edgert.runtime.kv_cache import KVCache


def filled_cache(capacity=16):
    cache = KVCache(KVCacheSpec(capacity, num_layers=2, num_kv_heads=2, head_dim=3))
    cache.storage[...] = np.arange(capacity, dtype=np.float32)[:, None]  # entry t holds value t
    return cache


def test_one_allocation_views():
    cache = filled_cache()
    assert cache.nbytes == KVCacheSpec(16, 2, 2, 3).bytes
    for buf in cache.buffers():
        assert np.shares_memory(buf, cache.storage) and buf.shape == (1, 2, 16, 3)
    views = {buf.ctypes.data for buf in cache.buffers()}
    assert len(views) == 2 * 2 and min(views) == cache.storage.ctypes.data


def test_commit_path_moves_only_accepted_entries():
    cache = filled_cache()
    cache.length = 4
    before = cache.storage.copy()
    cache.commit_path(np.array([0, 2, 5]))  # written at 4..9, keep offsets 0, 2, 5
    assert cache.length == 7
    moved = cache.storage[..., 4:7, :]
    np.testing.assert_array_equal(moved[..., 0], np.broadcast_to([4.0, 6.0, 9.0], moved.shape[:-1]))
    # nothing else changed: prefix, and everything from 7 on
    np.testing.assert_array_equal(cache.storage[..., :4, :], before[..., :4, :])
    np.testing.assert_array_equal(cache.storage[..., 7:, :], before[..., 7:, :])


def test_commit_path_identity_is_free():
    cache = filled_cache()
    cache.length = 2
    cache.commit_path(np.array([0, 1, 2]))
    assert cache.length == 5
    np.testing.assert_array_equal(cache.storage[0, 0, 0, 0, :, 0], np.arange(16))


def test_capacity_is_enforced():
    cache = filled_cache(capacity=8)
    cache.advance(6)
    with pytest.raises(CapacityError, match="KV capacity 8"):
        cache.advance(3)
    with pytest.raises(CapacityError):
        cache.commit_path(np.array([0, 2]))  # offset 2 lies at position 8, outside
    assert cache.length == 6


@pytest.mark.parametrize("capacity, head_dim", [(8, 4), (512, 16), (33, 64)])
def test_every_layer_buffer_is_64_byte_aligned(capacity, head_dim):
    """Compiled kernels use aligned vector loads on the cache (NumPy alone gives 16 bytes:
    the TVM backend faulted on such a cache)."""
    cache = KVCache(KVCacheSpec(capacity, 3, 2, head_dim))
    assert cache.storage.ctypes.data % 64 == 0
    assert all(buf.ctypes.data % 64 == 0 for buf in cache.buffers()) == (
        capacity * head_dim * 4 % 64 == 0)
    assert not cache.storage.any() and cache.nbytes == 2 * 3 * 2 * capacity * head_dim * 4
