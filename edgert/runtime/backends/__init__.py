"""Backends run one decode step of an artifact's graph; found by name in ``BACKENDS``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgert.artifact.manifest import GraphSpec, Manifest
from edgert.errors import BackendError, ConfigError
from edgert.runtime.kv_cache import KVCacheBase


def heads_read_root(graph: GraphSpec) -> bool:
    """Whether a Medusa heads graph takes the tree root token (token-conditioned heads)."""
    return any(spec.name == "root" for spec in graph.inputs)

@dataclass
class StepInputs:
    """One forward: q new tokens after ``past_len`` cached ones."""

    input_ids: np.ndarray  # [1,q] int64
    position_ids: np.ndarray  # [1,q] int64
    tree_mask: np.ndarray  # [1,1,q,q] float32, additive
    logits_index: np.ndarray  # [n] int64
    past_len: int
    # the same structure as tree_mask, compactly: parent of each new token (-1: the prefix);
    # backends with tree kernels (tvm) read this instead of the dense mask
    parents: np.ndarray | None = None


@dataclass
class StepOutputs:
    logits: np.ndarray  # [n,V]
    hidden: np.ndarray  # [n,H]
    # every new row's hidden state [q,H], from graphs that return it (artifacts with a draft
    # layer, which reads it); None otherwise
    features: np.ndarray | None = None


class Backend(Protocol):
    """Runs a step; writes the q new K/V entries into ``cache`` at [past_len, past_len+q).

    A backend allocates the cache it runs over (once, at load): host memory shared zero-copy
    with its runtime (:class:`~edgert.runtime.kv_cache.KVCache`), or the memory of the device
    it runs on (:class:`~edgert.runtime.device_kv_cache.DeviceKVCache`). The decode loop only
    uses the :class:`~edgert.runtime.kv_cache.KVCacheBase` interface of it.
    """

    name: str
    device: str
    has_heads: bool
    cache: KVCacheBase

    def forward(self, step: StepInputs) -> StepOutputs: ...

    def medusa_topk(self, hidden: np.ndarray, roots: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Medusa heads on hidden [n,H] and the backbone's next token after each, roots [n]
        (read by token-conditioned heads only): (ids [K,n,k], logits [K,n,k])."""
        ...

    has_dhsa: bool

    def prefill_sparse(self, ids: np.ndarray, fixed_chunk: int = 0) -> StepOutputs:
        """DHSA prefill of a whole prompt into an empty cache (K/V written at [0, T)), in
        as many calls as the backend runs it (ORT: `prefill_calls`; TVM: one)."""
        ...

    has_draft: bool  # the artifact's draft layer runs here (its graph and the features)

    @property
    def draft_cache(self) -> KVCacheBase | None:
        """The draft layer's own one-layer cache, allocated when drafting first needs it."""
        ...

    def draft_forward(self, input_ids: np.ndarray, features: np.ndarray,
                      position_ids: np.ndarray, tree_mask: np.ndarray,
                      logits_index: np.ndarray, past_len: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One draft call of q rows after ``past_len`` draft-cache entries (written at
        [past_len, past_len + q)): (top-k ids [1,n,k], log-probabilities [1,n,k], features
        [1,n,H]) of the rows ``logits_index``; ``tree_mask`` [1,1,q,w] over the last w of the
        past_len + q entries, those before visible (0 visible, -1e9 hidden)."""
        ...


# (path, manifest, device, threads, kv_on_device) -> a backend with its cache
BackendFactory = Callable[[Path, Manifest, str, int, "bool | None"], Backend]


def _ort_factory(path, manifest, device, threads, kv_on_device):
    from edgert.runtime.backends.ort import OrtBackend

    if kv_on_device:
        raise BackendError("the ort backend keeps the KV cache in host memory (bound to ONNX "
                           "Runtime zero-copy); kv_on_device needs backend='tvm'")
    return OrtBackend(path, manifest, device, threads)


def _tvm_factory(path, manifest, device, threads, kv_on_device):
    from edgert.runtime.backends.tvm_vm import TvmBackend

    return TvmBackend(path, manifest, device, threads, kv_on_device)


BACKENDS: dict[str, BackendFactory] = {"ort": _ort_factory, "tvm": _tvm_factory}


def create_backend(name: str, path: Path, manifest: Manifest, device: str, threads: int = 0,
                   kv_on_device: bool | None = None) -> Backend:
    """The backend ``name`` over the artifact at ``path``; it allocates its KV cache
    (``backend.cache``). ``kv_on_device``: None = the backend's choice (tvm: in the device's
    memory on a GPU, host memory on cpu); True puts it in the device's memory on cpu too (the
    GPU's code path, run here)."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise BackendError(f"unknown backend '{name}'; available: {', '.join(sorted(BACKENDS))}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"threads must be an integer >= 0 (0: the runtime's default, every "
                          f"physical core), got {threads!r}")
    return factory(path, manifest, device, threads, kv_on_device)
