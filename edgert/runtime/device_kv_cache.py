"""The KV cache in a TVM device's memory (the TVM backend on a GPU, or on CPU when asked).

Per layer a key and a value buffer ``[Hkv, capacity, D]``, each one ``tvm.runtime`` tensor
allocated (and zeroed) at load on the device, never grown nor reallocated: the compiled decoder
writes its new entries into them in place (``edgert_kv_append``) and reads the prefix in place.
Medusa's commit runs on the device too: ``edgert_kv_commit`` (``passes.tir.kv_commit``)
moves the accepted entries of every buffer in one call. Nothing of the cache crosses to the
host while decoding; ``to_numpy`` copies it out for tests and debugging.
"""

from __future__ import annotations

import numpy as np

from edgert.artifact.manifest import KVCacheSpec
from edgert.artifact.tvm_build import KV_COMMIT_FUNCTION
from edgert.runtime.kv_cache import KVCacheBase


class DeviceKVCache(KVCacheBase):
    """``spec``'s buffers on ``device`` (a ``tvm.runtime.Device``); ``commit_lib`` is a runtime
    module holding ``edgert_kv_commit`` built for this spec and device: the one ``edgert
    compile`` wrote (``kv_commit.so``), or ``passes.tir.kv_commit.build_kv_commit_library``'s;
    None for a cache whose entries are only ever committed as written (the draft layer's)."""

    def __init__(self, spec: KVCacheSpec, device, commit_lib=None) -> None:
        import tvm

        super().__init__(spec)
        self.device = device
        self._tvm = tvm
        self._lib = commit_lib  # kept: the function calls into its code
        self._commit = commit_lib[KV_COMMIT_FUNCTION] if commit_lib is not None else None
        self.can_move_entries = self._commit is not None
        shape = (spec.num_kv_heads, spec.capacity, spec.head_dim)
        zeros = np.zeros(shape, dtype=spec.dtype)
        self._tensors = []
        for _ in range(2 * spec.num_layers):
            tensor = tvm.runtime.empty(shape, spec.dtype, device)
            tensor.copyfrom(zeros)  # memory is taken (and defined) at load, not while decoding
            self._tensors.append(tensor)
        # the offsets of a commit, on the device, per path length (a handful: 1 .. tree depth+1)
        self._offsets: dict[int, object] = {}

    def tensors(self) -> list:
        """key_0, value_0, key_1, ... as [Hkv, C, D] device tensors, in graph order."""
        return list(self._tensors)

    def _move(self, offsets: np.ndarray) -> None:
        if self._commit is None:
            raise NotImplementedError("this device cache has no commit kernel: it cannot move "
                                      "entries")
        staged = self._offsets.get(len(offsets))
        if staged is None:
            staged = self._tvm.runtime.empty((len(offsets),), "int64", self.device)
            self._offsets[len(offsets)] = staged
        staged.copyfrom(offsets)
        self._commit(*self._tensors, staged, self.length)

    def to_numpy(self) -> np.ndarray:
        """A host copy shaped like :attr:`KVCache.storage`: [L, 2, 1, Hkv, C, D]."""
        spec = self.spec
        out = np.stack([t.numpy() for t in self._tensors])
        return out.reshape(spec.num_layers, 2, 1, spec.num_kv_heads, spec.capacity,
                           spec.head_dim)

