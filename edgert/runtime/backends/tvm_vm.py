"""TVM backend: the module ``edgert compile`` built, run by the Relax VM over the KV cache.

The compiled decoder takes each layer's cache buffer [Hkv, C, D] and writes the q new entries
in place (edgert's kv-append kernel), then runs edgert's tree-attention kernel. The tree reaches
the kernel as compact DFS intervals built from the step's parent indices, not as a dense mask.

Where the cache lives:

- ``device="cpu"`` (default): the llvm build over zero-copy DLPack views of the runtime's one
  host allocation (:class:`KVCache`); Medusa's commit moves accepted entries in that
  allocation with NumPy and the next call sees them.
- ``device="cuda"``: the cuda build (``tvm/cuda/decoder.so``) on ``tvm.cuda(0)`` over a
  :class:`DeviceKVCache` in the GPU's memory (allocated at load, never grown); Medusa's commit
  is the compiled ``edgert_kv_commit`` (``tvm/cuda/kv_commit.so``) on the GPU. Only token ids,
  positions and the tree intervals go to the device per step; logits and hidden come back.
- ``device="cpu", kv_on_device=True``: the llvm build over a :class:`DeviceKVCache` on
  ``tvm.cpu()``: the GPU's cache code path (TVM-allocated buffers, the commit kernel), run on the
  CPU so that the tests cover it.

When the artifact has DHSA, the module has a second function, ``prefill_dhsa`` (see
``passes.fuse_dhsa_prefill``): the whole prompt in one call, sparse attention from the boundary
layer on, its K/V written in place into the same cache buffers at [0, T).

When the artifact has a draft layer, ``draft.so`` runs one draft call over the draft's own
cache (allocated when drafting first needs it, beside the backbone's, in the same kind of
memory), and both decoder functions also return every row's features (the draft's input).
The draft's mask reaches its kernel as the graph's additive mask rows (``visibility``).
"""

from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from edgert.artifact.manifest import GraphKey, Manifest
from edgert.artifact.tvm_build import (
    DECODER,
    DHSA_FUNCTION,
    DRAFT,
    KV_COMMIT,
    MEDUSA,
    build_directory,
    library,
    read_build,
)
from edgert.errors import BackendError, last_line
from edgert.medusa.tree_order import (
    causal_order,
    parents_from_mask,
    tree_order_from_parents,
)
from edgert.runtime.backends import StepInputs, StepOutputs, heads_read_root
from edgert.runtime.kv_cache import ALIGNMENT, KVCache

DEVICE_TARGETS = {"cpu": "llvm", "cuda": "cuda"}


def check_cuda_device() -> None:
    """BackendError unless TVM's CUDA runtime is loaded and sees a device."""
    import tvm
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise BackendError("no CUDA runtime here: TVM's CUDA runtime (libtvm_runtime_cuda) is "
                           "not loaded, it needs an NVIDIA driver (libcuda.so.1); run on a "
                           "machine with an NVIDIA GPU, or use device='cpu'")
    if not tvm.cuda(0).exist:
        raise BackendError("no CUDA device: TVM's CUDA runtime sees no GPU (tvm.cuda(0)); "
                           "check the driver and CUDA_VISIBLE_DEVICES, or use device='cpu'")


def _compile_at_load(code: str, default) -> bytes:
    """A CUDA source the build has no fatbin for: TVM's own compiler callback (NVRTC through
    cuda-python), else nvcc when cuda-python is missing."""
    try:
        import cuda.bindings  # noqa: F401  (NVRTC, what TVM's callback uses by default)
    except ImportError:
        if shutil.which("nvcc"):
            from tvm.support.nvcc import compile_cuda

            return compile_cuda(code, target_format="fatbin", compiler="nvcc")
        raise RuntimeError("no CUDA compiler here (neither cuda-python's NVRTC nor nvcc) and "
                           "the build has no precompiled fatbin for this source") from None
    return default(code)


@contextmanager
def precompiled_cuda(directory: Path, files: list[str]):
    """While loading cuda libraries: their embedded CUDA sources are compiled by the fatbins
    ``edgert compile`` wrote next to them (``X.cu`` + ``X.fatbin``, matched by the source's
    SHA-256), so loading needs no CUDA compiler; any other source goes to ``_compile_at_load``.

    (This TVM's cuda libraries carry CUDA C source, compiled when they are loaded through the
    global ``tvm_callback_cuda_compile``; it is overridden for the duration only.)
    """
    import tvm_ffi

    names = set(files)
    binaries = {}
    for name in files:
        fatbin = name[:-len(".cu")] + ".fatbin"
        if name.endswith(".cu") and fatbin in names:
            digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
            binaries[digest] = (directory / fatbin).read_bytes()
    key = "tvm_callback_cuda_compile"
    default = tvm_ffi.get_global_func(key, allow_missing=True)

    def compile_cuda(code: str) -> bytes:
        binary = binaries.get(hashlib.sha256(code.encode()).hexdigest())
        return binary if binary is not None else _compile_at_load(code, default)

    tvm_ffi.register_global_func(key, compile_cuda, override=True)
    try:
        yield
    finally:
        if default is not None:
            tvm_ffi.register_global_func(key, default, override=True)


# TVM's CPU thread pool: (affinity mode, threads); mode 1 = the big cores (every core on an
# x86 machine), as TVM's own default pool takes them
_CONFIG_THREADPOOL = "runtime.config_threadpool"
_BIG_CORES = 1


def set_cpu_threads(tvm_ffi, threads: int) -> None:
    """Size TVM's CPU thread pool (process-wide, as ONNX Runtime's intra-op setting is per
    session): ``--threads`` governs both backends."""
    tvm_ffi.get_global_func(_CONFIG_THREADPOOL)(_BIG_CORES, threads)


class TvmBackend:
    name = "tvm"

    def __init__(self, path: Path, manifest: Manifest, device: str = "cpu", threads: int = 0,
                 kv_on_device: bool | None = None) -> None:
        try:
            import tvm
            import tvm_ffi
            from tvm import relax
        except ImportError:
            raise BackendError("the tvm backend needs apache-tvm; install edgert[tvm]") from None
        target = DEVICE_TARGETS.get(device)
        if target is None:
            raise BackendError(f"the tvm backend runs on {', '.join(DEVICE_TARGETS)}; device "
                               f"'{device}' needs its compiled module and runtime")
        on_device = device != "cpu" if kv_on_device is None else bool(kv_on_device)
        if device != "cpu" and not on_device:
            raise BackendError(f"the tvm backend on {device} keeps the KV cache in the device's "
                               "memory (its kernels cannot read host memory); leave "
                               "kv_on_device unset")
        build = read_build(manifest.compiled, path, target)
        build.verify(path)
        directory = build_directory(path, target)
        decoder = library(DECODER)
        if not build.has_library(DECODER):
            why = "; ".join(build.notes) or "an older edgert wrote only sources"
            raise BackendError(f"the {target} build of {path} has no loadable library "
                               f"({decoder}): {why}; re-run `edgert compile {path} --target "
                               f"{target}`")
        if on_device and not build.has_library(KV_COMMIT):
            raise BackendError(f"the {target} build of {path} has no {library(KV_COMMIT)} (the "
                               "device KV cache's commit kernel); re-run `edgert compile "
                               f"{path} --target {target}`")
        if target == "cuda":
            check_cuda_device()
            dev = tvm.cuda(0)
        else:
            dev = tvm.cpu()
        self.device = device
        self._tvm = tvm
        self._tvm_ffi = tvm_ffi
        if threads > 0 and device == "cpu":
            set_cpu_threads(tvm_ffi, threads)
        self._dev = dev
        stems = [stem for stem in (DECODER, MEDUSA, DRAFT, KV_COMMIT)
                 if build.has_library(stem)]
        loaded = {}
        try:
            with precompiled_cuda(directory, build.files) if target == "cuda" else nullcontext():
                for stem in stems:
                    loaded[stem] = tvm.runtime.load_module(str(directory / library(stem)))
        except Exception as exc:  # TVM raises RuntimeError/TVMError from the loaders
            raise BackendError(f"cannot load the {target} build of {path}: {last_line(exc)}"
                               ) from None
        # the loaded libraries are kept: the VMs and the commit call into their code
        self._libs = loaded
        self.vm = relax.VirtualMachine(loaded[DECODER], dev)
        self.heads_vm = (relax.VirtualMachine(loaded[MEDUSA], dev) if MEDUSA in loaded else None)
        medusa = manifest.graphs.get(GraphKey.MEDUSA)
        self._heads_read_root = medusa is not None and heads_read_root(medusa)
        # the decoder returns every row's features last (artifacts with a draft layer)
        self._features = "features" in {t.name for t in
                                         manifest.graphs[GraphKey.PORTABLE].outputs}
        self.draft_vm = (relax.VirtualMachine(loaded[DRAFT], dev)
                         if DRAFT in loaded and self._features else None)
        self._draft_cache_spec = manifest.draft_kv_cache
        self._draft_cache = None
        self._on_device = on_device
        if on_device:
            from edgert.runtime.device_kv_cache import DeviceKVCache

            try:
                self.cache = DeviceKVCache(manifest.kv_cache, dev, loaded[KV_COMMIT])
            except Exception as exc:  # out of device memory, mostly
                raise BackendError(f"cannot set up the KV cache ({manifest.kv_cache.bytes >> 20}"
                                   f" MiB) on {device}: {last_line(exc)} (out of memory: "
                                   "re-export with a smaller --max-context)") from None
            self._cache_tensors = self.cache.tensors()
        else:
            self.cache = KVCache(manifest.kv_cache)
            self._cache_tensors = self._host_tensors(self.cache)
        self.has_dhsa = self.vm.module.implements_function(DHSA_FUNCTION)

    def _host_tensors(self, cache: KVCache) -> list:
        """[1,Hkv,C,D] views -> [Hkv,C,D] zero-copy tensors over the runtime's cache memory."""
        misaligned = [i for i, buf in enumerate(cache.buffers()) if buf.ctypes.data % ALIGNMENT]
        if misaligned:
            raise BackendError(f"KV cache buffers {misaligned} are not {ALIGNMENT}-byte "
                               "aligned; the compiled kernels would fault on them "
                               "(capacity x head_dim must be a multiple of 16)")
        return [self._tvm_ffi.from_dlpack(buf[0]) for buf in cache.buffers()]

    def _tensor(self, array: np.ndarray):
        return self._tvm.runtime.tensor(np.ascontiguousarray(array), device=self._dev)

    @property
    def has_heads(self) -> bool:
        return self.heads_vm is not None

    def medusa_topk(self, hidden: np.ndarray, roots: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        args = [self._tensor(hidden)]
        if self._heads_read_root:
            args.append(self._tensor(np.asarray(roots, dtype=np.int64)))
        out = self.heads_vm["main"](*args)
        return out[0].numpy(), out[1].numpy()

    def _outputs(self, out) -> StepOutputs:
        """(logits, hidden, ...[, features]) of a decoder function -> StepOutputs."""
        features = out[len(out) - 1].numpy()[0] if self._features else None
        return StepOutputs(logits=out[0].numpy()[0], hidden=out[1].numpy()[0],
                           features=features)

    def forward(self, step: StepInputs) -> StepOutputs:
        tensor = self._tensor
        q = step.input_ids.shape[1]
        parents = step.parents if step.parents is not None else parents_from_mask(step.tree_mask)
        chain = np.array_equal(parents, np.arange(-1, q - 1))
        order = causal_order(q) if chain else tree_order_from_parents(parents)
        out = self.vm["main"](tensor(step.input_ids), tensor(step.position_ids), tensor(order),
                              tensor(step.logits_index), *self._cache_tensors,
                              self._tvm.runtime.ShapeTuple([step.past_len]))
        return self._outputs(out)

    def prefill_sparse(self, ids: np.ndarray, fixed_chunk: int = 0) -> StepOutputs:
        """Whole-prompt DHSA prefill into an empty cache: ids [1,T]; K/V land at [0, T)."""
        if not self.has_dhsa:
            raise BackendError("this TVM build has no DHSA prefill; re-run `edgert compile` "
                               "on an artifact exported with DHSA (or pass dhsa=False)")
        tensor = self._tensor
        q = ids.shape[1]
        out = self.vm[DHSA_FUNCTION](tensor(np.asarray(ids, dtype=np.int64)),
                                     tensor(np.arange(q, dtype=np.int64)[None]),
                                     tensor(causal_order(q)),
                                     tensor(np.array([q - 1], dtype=np.int64)),
                                     *self._cache_tensors, int(fixed_chunk))
        return self._outputs(out)

    # -- the draft layer ------------------------------------------------------------------
    @property
    def has_draft(self) -> bool:
        """The build has the draft layer and the decoder returns the features it reads (an
        artifact exported before the portable draft graph has neither: re-export it)."""
        return self.draft_vm is not None

    @property
    def draft_cache(self):
        """The draft layer's own cache (one layer), allocated when drafting first needs it,
        in host memory shared zero-copy with the kernels, or in the device's memory."""
        if self._draft_cache is None and self.has_draft:
            spec = self._draft_cache_spec
            if self._on_device:
                from edgert.runtime.device_kv_cache import DeviceKVCache

                cache = DeviceKVCache(spec, self._dev)  # entries only ever committed as written
                self._draft_tensors = cache.tensors()
            else:
                cache = KVCache(spec)
                self._draft_tensors = self._host_tensors(cache)
            self._draft_cache = cache
        return self._draft_cache

    def draft_forward(self, input_ids: np.ndarray, features: np.ndarray,
                      position_ids: np.ndarray, tree_mask: np.ndarray,
                      logits_index: np.ndarray, past_len: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One draft call (the ONNX Runtime backend's ``draft_forward``): q rows after
        ``past_len`` draft-cache entries, written at [past_len, past_len + q); ``tree_mask``
        [1,1,q,w] over the last w entries. Returns (top-k ids, log-probabilities, features)."""
        if self.draft_cache is None:
            raise BackendError("this TVM build has no draft layer; re-export the artifact with "
                               "a draft and re-run `edgert compile`")
        tensor = self._tensor
        out = self.draft_vm["main"](
            tensor(np.asarray(input_ids, dtype=np.int64)),
            tensor(np.asarray(features, dtype=np.float32)),
            tensor(np.asarray(position_ids, dtype=np.int64)),
            tensor(np.asarray(tree_mask, dtype=np.float32)[0, 0]),
            tensor(np.asarray(logits_index, dtype=np.int64)), *self._draft_tensors,
            self._tvm.runtime.ShapeTuple([past_len]))
        return out[0].numpy(), out[1].numpy(), out[2].numpy()
