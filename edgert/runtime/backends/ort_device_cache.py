"""The KV cache in a GPU's memory, for ONNX Runtime's CUDA execution provider.

Per layer a key and a value ``OrtValue`` of ``[1, Hkv, capacity, D]`` are allocated once, on
the device, and bound as the GQA graph's ``past_*`` input and ``present_*`` output: the graph
reads the prefix in place and writes the step's q new entries at ``[P, P+q)``. No step copies
the cache between host and device; only the step's small inputs (ids, positions, mask) go up
and its logits and hidden states come down. (Bound as host arrays, as on the CPU, ONNX
Runtime would copy every capacity-sized buffer to the GPU and back on every step.)

Entries are not moved on the device (ONNX Runtime exposes no in-place device copy), so
speculative steps verify chains here, whose accepted prefix is already in place
(``can_move_entries`` False; the Engine checks it), and parallel slots, which compact the
cache, need the host cache.
"""

from __future__ import annotations

import numpy as np

from edgert.artifact.manifest import KVCacheSpec
from edgert.errors import BackendError
from edgert.runtime.kv_cache import KVCacheBase

_DTYPES = {"float32": np.float32, "float16": np.float16}


class OrtDeviceKVCache(KVCacheBase):
    """``values``: past_key_0, past_value_0, past_key_1, ... as device OrtValues."""

    can_move_entries = False

    def __init__(self, spec: KVCacheSpec, device: str = "cuda", device_id: int = 0,
                 ort_module=None) -> None:
        super().__init__(spec)
        if ort_module is None:
            import onnxruntime as ort_module
        shape = [1, spec.num_kv_heads, spec.capacity, spec.head_dim]
        try:
            self.values = [ort_module.OrtValue.ortvalue_from_shape_and_type(
                shape, _DTYPES[spec.dtype], device, device_id)
                for _ in range(2 * spec.num_layers)]
        except Exception as exc:  # ORT's allocation failures are RuntimeErrors
            raise BackendError(
                f"cannot allocate the {spec.bytes / 2**20:.0f} MiB KV cache on {device}:"
                f"{device_id} ({str(exc).splitlines()[0][:200]}); re-export with a smaller "
                "--max-context or use another device") from None
        self.device = device

    def buffers(self) -> list:
        return list(self.values)

    def _move(self, offsets: np.ndarray) -> None:
        raise BackendError("the KV cache on the GPU keeps entries where they were written: "
                           "verify chains, not branching trees, on this backend")
