"""TVM backend: the module ``edgert compile`` built, run by the Relax VM over the same cache.

The compiled decoder takes each layer's cache buffer [Hkv, C, D] and writes the q new entries
in place (edgert's kv-append kernel), then runs edgert's tree-attention kernel; the buffers are
zero-copy DLPack views of the runtime's one cache allocation, so Medusa's commit (moving
accepted entries in that allocation) is seen by the next call. The tree reaches the kernel as
compact DFS intervals built from the step's parent indices, not as a dense mask.

When the artifact has DHSA, the module has a second function, ``prefill_dhsa`` (see
``passes.fuse_dhsa_prefill``): the whole prompt in one call, sparse attention from the boundary
layer on, its K/V written in place into the same cache views at [0, T).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgert.errors import ArtifactError, BackendError
from edgert.manifest import Manifest, sha256_file
from edgert.passes.kernels.tree_attention import causal_order, tree_order_from_parents
from edgert.runtime.backends import StepInputs, StepOutputs
from edgert.runtime.kv_cache import ALIGNMENT, KVCache

DEVICE_TARGETS = {"cpu": "llvm"}
DHSA_FUNCTION = "prefill_dhsa"  # edgert.passes.fuse_dhsa_prefill.FUNCTION


def _parents_from_mask(mask: np.ndarray) -> np.ndarray:
    """Nearest visible earlier new token (the parent) per row of an ancestor mask."""
    visible = mask[0, 0] == 0
    q = visible.shape[0]
    parents = np.full(q, -1, dtype=np.int64)
    for i in range(q):
        earlier = np.flatnonzero(visible[i, :i])
        parents[i] = earlier[-1] if len(earlier) else -1
    return parents


class TvmBackend:
    name = "tvm"

    def __init__(self, path: Path, manifest: Manifest, cache: KVCache, device: str = "cpu",
                 threads: int = 0) -> None:
        try:
            import tvm
            import tvm_ffi
            from tvm import relax
        except ImportError:
            raise BackendError("the tvm backend needs apache-tvm; install edgert[tvm]") from None
        target = DEVICE_TARGETS.get(device)
        if target is None:
            raise BackendError(f"the tvm backend runs on {', '.join(DEVICE_TARGETS)} here; "
                               f"device '{device}' needs its compiled module and runtime")
        build = manifest.compiled.get(target)
        if not build:
            raise ArtifactError(f"artifact {path} has no TVM build for {target}; run "
                                f"`edgert compile {path} --target {target}` first")
        directory = path / "tvm" / target
        for name, digest in build["hashes"].items():
            file = directory / name
            if not file.is_file() or sha256_file(file) != digest:
                raise ArtifactError(f"{file} is missing or does not match its hash; re-run "
                                    f"`edgert compile {path} --target {target}`")
        self.device = device
        self.cache = cache
        dev = tvm.cpu()
        self._tvm = tvm
        # the loaded libraries are kept: the VMs call into their code
        self._libs = [tvm.runtime.load_module(str(directory / "decoder.so"))]
        self.vm = relax.VirtualMachine(self._libs[0], dev)
        heads = directory / "medusa.so"
        self.heads_vm = None
        if heads.is_file():
            self._libs.append(tvm.runtime.load_module(str(heads)))
            self.heads_vm = relax.VirtualMachine(self._libs[1], dev)
        misaligned = [i for i, buf in enumerate(cache.buffers()) if buf.ctypes.data % ALIGNMENT]
        if misaligned:
            raise BackendError(f"KV cache buffers {misaligned} are not {ALIGNMENT}-byte aligned; "
                               "the compiled kernels would fault on them (capacity x head_dim "
                               "must be a multiple of 16)")
        # [1,Hkv,C,D] views -> [Hkv,C,D] zero-copy tensors over the runtime's cache memory
        self._cache_tensors = [tvm_ffi.from_dlpack(buf[0]) for buf in cache.buffers()]
        self.has_dhsa = self.vm.module.implements_function(DHSA_FUNCTION)

    @property
    def has_heads(self) -> bool:
        return self.heads_vm is not None

    def medusa_topk(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.heads_vm["main"](self._tvm.runtime.tensor(np.ascontiguousarray(hidden)))
        return out[0].numpy(), out[1].numpy()

    def forward(self, step: StepInputs) -> StepOutputs:
        tensor = self._tvm.runtime.tensor
        q = step.input_ids.shape[1]
        parents = step.parents if step.parents is not None else _parents_from_mask(step.tree_mask)
        chain = np.array_equal(parents, np.arange(-1, q - 1))
        order = causal_order(q) if chain else tree_order_from_parents(parents)
        out = self.vm["main"](tensor(step.input_ids), tensor(step.position_ids), tensor(order),
                              tensor(step.logits_index), *self._cache_tensors,
                              self._tvm.runtime.ShapeTuple([step.past_len]))
        return StepOutputs(logits=out[0].numpy()[0], hidden=out[1].numpy()[0])

    def prefill_sparse(self, ids: np.ndarray, fixed_chunk: int = 0) -> StepOutputs:
        """Whole-prompt DHSA prefill into an empty cache: ids [1,T]; K/V land at [0, T)."""
        if not self.has_dhsa:
            raise BackendError("this TVM build has no DHSA prefill; re-run `edgert compile` "
                               "on an artifact exported with DHSA (or pass dhsa=False)")
        tensor = self._tvm.runtime.tensor
        q = ids.shape[1]
        out = self.vm[DHSA_FUNCTION](tensor(np.ascontiguousarray(ids, dtype=np.int64)),
                                     tensor(np.arange(q, dtype=np.int64)[None]),
                                     tensor(causal_order(q)),
                                     tensor(np.array([q - 1], dtype=np.int64)),
                                     *self._cache_tensors, int(fixed_chunk))
        return StepOutputs(logits=out[0].numpy()[0], hidden=out[1].numpy()[0])
