"""ONNX Runtime backend: ``model.ort.onnx`` (GroupQueryAttention) over the shared KV cache.

Each layer's cache buffer is bound once, through IOBinding, as both ``past_*`` and
``present_*``: GQA reads the prefix in place and writes the q new entries at
[past_len, past_len+q). Nothing proportional to the context is copied per step.

Only the decoder's session opens at load. The Medusa heads' session opens on the first
heads call (after the first token, so it does not delay it), the DHSA prefill's on the first
prompt long enough for it: each ONNX Runtime session packs its own copy of the quantized
weights it reads, so a session a request does not need costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgert.artifact.manifest import GraphKey, Manifest
from edgert.dhsa.params import DHSAParams, prefill_calls
from edgert.errors import ArtifactError, BackendError, ConfigError
from edgert.runtime.backends import StepInputs, StepOutputs, heads_read_root
from edgert.runtime.backends.ort_cache import cached_session
from edgert.runtime.backends.ort_device_cache import OrtDeviceKVCache
from edgert.runtime.kv_cache import KVCache

GRAPH_KEY = GraphKey.ORT_GQA

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise BackendError(f"unknown device '{device}' for the ort backend; choose one of "
                           f"{', '.join(PROVIDERS)}")
    wanted = PROVIDERS[device][0]
    if wanted not in ort.get_available_providers():
        raise BackendError(
            f"ONNX Runtime here has no {wanted} (available: "
            f"{', '.join(ort.get_available_providers())}); for --device cuda install "
            "onnxruntime-gpu on a machine with an NVIDIA GPU, or use --device cpu")
    return PROVIDERS[device]


def _session(path: Path, device: str, threads: int, spin: bool = True,
             memory_pattern: bool = True, sha256: str | None = None):
    """``spin=False`` for sessions that run between decode steps (the Medusa heads): ONNX
    Runtime's idle workers spin-wait after a run, and a second session's spinning workers
    would take the cores from the next decode step. ``memory_pattern=False`` for graphs whose
    input shapes differ on every call (the DHSA prefill calls): ONNX Runtime records one
    allocation plan per input shape and, when the shape comes again (the next request of
    the same length), allocates that plan as one more block; measured on SmolLM2 at 8K, that
    added 100-200 MB on the second request, for no measurable speed-up. ``sha256``: the
    graph's digest from the manifest, the key of its optimized, pre-packed copy in the
    session cache (``ort_cache``)."""
    import onnxruntime as ort

    def options():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.enable_mem_pattern = memory_pattern
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    try:
        return cached_session(path, sha256, options, _providers(device))
    except BackendError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
        raise session_error(exc, path, device) from None


# what ONNX Runtime's session-creation messages say, by cause (lowercase fragments)
_OUT_OF_MEMORY = ("bad_alloc", "bad allocation", "out of memory", "failed to allocate",
                  "cannot allocate")
_PROVIDER = ("ep error", "execution provider", "provider", "cuda", "cudnn", "cublas")
_OPTION = ("sessionoptions", "session option", "invalid argument", "intra_op", "inter_op",
           "config entry")


def run_error(exc: BaseException, file: str) -> Exception:
    """A failed session run, typed: out of memory, else the graph (it loaded, so its file is
    well formed, but a damaged constant or shape can still fail executing)."""
    last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, MemoryError) or any(k in text for k in _OUT_OF_MEMORY):
        return BackendError(f"out of memory running {file} ({last}); free memory or "
                            "re-export with a smaller --max-context")
    return ArtifactError(f"ONNX Runtime failed running {file} ({last}); the artifact is "
                         "damaged: check it with `edgert verify` or re-export it")


def session_error(exc: BaseException, path: Path, device: str) -> Exception:
    """One typed, one-line error for a failed session creation, by its cause: out of memory,
    the execution provider, a session option, else a damaged graph (the artifact)."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, MemoryError) or any(k in text for k in _OUT_OF_MEMORY):
        return BackendError(f"out of memory creating the ONNX Runtime session for {path.name} "
                            f"({first_line}); free memory, or re-export with smaller weights "
                            "(--weights q4) or a smaller --max-context")
    if any(k in text for k in _PROVIDER):
        return BackendError(f"ONNX Runtime's {device} execution provider failed on "
                            f"{path.name} ({first_line}); check the device's driver and "
                            "onnxruntime build, or use --device cpu")
    if any(k in text for k in _OPTION):
        return ConfigError(f"ONNX Runtime refused a session option for {path.name} "
                           f"({first_line}); check --threads and the engine's options")
    return ArtifactError(f"ONNX Runtime cannot load {path} ({first_line}); the artifact is "
                         "corrupt, re-export it")


def _allocate_cache(spec, device: str, ort) -> tuple:
    """(the cache, its buffers as OrtValues in graph order): host memory shared zero-copy on
    the CPU; the GPU's own memory on cuda (bound in place there too: no per-step copy)."""
    if device == "cuda":
        cache = OrtDeviceKVCache(spec, "cuda", 0, ort)
        return cache, cache.values
    cache = KVCache(spec)
    return cache, [ort.OrtValue.ortvalue_from_numpy(buf) for buf in cache.buffers()]


def bound_outputs(binding) -> list:
    """The outputs of the binding's last run, in binding order, each with ``.numpy()``.

    ``IOBinding.get_outputs()`` wraps every output in a Python OrtValue, the 60 cache buffers
    included: 0.26 ms of a ~11 ms decode step on SmolLM2 (cProfile, 2 cores). The pybind
    vector's own items have the same ``.numpy()``; only the outputs read get converted (the
    public call where a binding has no such vector)."""
    inner = getattr(binding, "_iobinding", None)
    return inner.get_outputs() if inner is not None else binding.get_outputs()


class OrtBackend:
    name = "ort"

    def __init__(self, path: Path, manifest: Manifest, device: str = "cpu",
                 threads: int = 0) -> None:
        import onnxruntime as ort

        graph = manifest.graphs.get(GRAPH_KEY)
        if graph is None:
            raise ArtifactError(f"artifact {path} has no '{GRAPH_KEY}' graph for ONNX Runtime; "
                                "re-export it with this edgert")
        self._path, self._threads = path, threads
        self._weights_sha = manifest.files.get(manifest.weights_file, "")
        self._files = manifest.files
        self.session = _session(path / graph.file, device, threads,
                                sha256=self._digest(graph.file))
        self._graph_file = graph.file
        self._medusa = manifest.graphs.get(GraphKey.MEDUSA)
        self._medusa_config = manifest.medusa or {}
        self._heads_session = None
        self._heads_read_root = self._medusa is not None and heads_read_root(self._medusa)
        self.device = device
        self.cache, self._cache_values = _allocate_cache(manifest.kv_cache, device, ort)
        self.binding = self.session.io_binding()
        # logits and hidden are bound first so they are outputs 0 and 1 of get_outputs()
        self.binding.bind_output("logits", "cpu")
        self.binding.bind_output("hidden", "cpu")
        for i, value in enumerate(self._cache_values):
            kind = "key" if i % 2 == 0 else "value"
            self.binding.bind_ortvalue_input(f"past_{kind}_{i // 2}", value)
            self.binding.bind_ortvalue_output(f"present_{kind}_{i // 2}", value)
        # artifacts with a draft layer: the graphs also return every row's features
        self._features = "features" in {t.name for t in graph.outputs}
        if self._features:
            self.binding.bind_output("features", "cpu")
            self._features_index = 2 + len(self._cache_values)  # get_outputs(): bind order
        self._dhsa_spec = self._check_dhsa_graph(path, manifest)
        self.dhsa_params = DHSAParams.from_manifest(manifest) if self._dhsa_spec else None
        self._dhsa_session = None
        self._draft_spec = manifest.graphs.get(GraphKey.DRAFT)
        self._draft_session = None
        self._draft_cache_spec = manifest.draft_kv_cache
        self._draft_cache: KVCache | None = None

    def _digest(self, graph_file: str) -> str | None:
        """What a session's cache entry is keyed by: the graph's SHA-256 and that of the
        weights file it reads (two artifacts' graphs can be byte-identical over different
        weights)."""
        graph = self._files.get(graph_file)
        return f"{graph}:{self._weights_sha}" if graph else None

    @property
    def has_heads(self) -> bool:
        return self._medusa is not None

    @property
    def heads_session(self):
        """The Medusa heads' session, opened on first use."""
        if self._heads_session is None and self._medusa is not None:
            self._heads_session = _session(self._path / self._medusa.file, self.device,
                                           self._threads, spin=False,
                                           sha256=self._digest(self._medusa.file))
        return self._heads_session

    def medusa_topk(self, hidden: np.ndarray, roots: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """hidden [n,H], roots [n] -> (ids [K,n,k], logits [K,n,k]) of the Medusa heads."""
        feed = {"hidden": hidden}
        if self._heads_read_root:
            feed["root"] = np.asarray(roots, dtype=np.int64)
        try:
            ids, logits = self.heads_session.run(None, feed)
        except Exception as exc:
            raise run_error(exc, self._medusa.file) from None
        want = (self._medusa_config["num_heads"], len(hidden), self._medusa_config["topk"])
        if ids.shape != want or logits.shape != want:
            raise ArtifactError(f"{self._medusa.file} returned top-k of shape {ids.shape}, not "
                                f"[heads, n, topk] = {list(want)}; the artifact is damaged: "
                                "re-export it")
        return ids, logits

    @staticmethod
    def _check_dhsa_graph(path: Path, manifest: Manifest):
        spec = manifest.graphs.get(GraphKey.DHSA)
        if spec is not None and "prompt_length" not in {t.name for t in spec.inputs}:
            raise ArtifactError(f"artifact {path} has a whole-prompt DHSA graph from an older "
                                "edgert; re-export it (the DHSA graph now prefills in chunks)")
        return spec

    @property
    def dhsa_session(self):
        """The DHSA prefill-call session, opened on the first sparse prefill."""
        if self._dhsa_session is None and self._dhsa_spec is not None:
            self._dhsa_session = self._open_dhsa_session()
        return self._dhsa_session

    def _open_dhsa_session(self):
        """The DHSA prefill-call graph, with the cache buffers bound in place as its past
        inputs and present outputs."""
        # no spinning: its idle workers would take the cores from the decode steps after it
        session = _session(self._path / self._dhsa_spec.file, self.device, self._threads,
                           spin=False, memory_pattern=False,
                           sha256=self._digest(self._dhsa_spec.file))
        self._chunk_starts = np.zeros(self.cache.capacity, dtype=bool)
        self.dhsa_binding = session.io_binding()
        self._dhsa_inputs = {i.name for i in session.get_inputs()}
        presents = []
        for i, value in enumerate(self._cache_values):  # in place, as for GQA
            kind = "key" if i % 2 == 0 else "value"
            self.dhsa_binding.bind_ortvalue_input(f"past_{kind}_{i // 2}", value)
            self.dhsa_binding.bind_ortvalue_output(f"present_{kind}_{i // 2}", value)
            presents.append(f"present_{kind}_{i // 2}")
        # get_outputs() lists outputs in binding order: the presents above, then these
        self._dhsa_outputs = [*presents, "logits", "hidden", "chunk_starts",
                              *(["features"] if self._features else [])]
        return session

    @property
    def has_dhsa(self) -> bool:
        return self._dhsa_spec is not None

    def prefill_sparse(self, ids: np.ndarray, fixed_chunk: int = 0) -> StepOutputs:
        """DHSA prefill into an empty cache, call by call (``prefill_calls``: query chunks of
        ``prefill_chunk`` tokens against the cache): ids [1,T]; K/V land at [0, T)."""
        total = ids.shape[1]
        session = self.dhsa_session
        b = self.dhsa_binding
        starts = self._chunk_starts
        features = []
        for name, value in (("dhsa_fixed_chunk", fixed_chunk), ("prompt_length", total)):
            if name in self._dhsa_inputs:  # (unused inputs leave a graph whose layers
                b.bind_cpu_input(name, np.array(value, dtype=np.int64))  # are all dense)
        for start, end in prefill_calls(total, self.dhsa_params):
            b.bind_cpu_input("input_ids", np.ascontiguousarray(ids[:, start:end]))
            b.bind_cpu_input("position_ids", np.arange(start, end, dtype=np.int64)[None])
            b.bind_cpu_input("logits_index", np.array([end - start - 1], dtype=np.int64))
            b.bind_cpu_input("past_chunk_starts", starts[:start])
            for name in self._dhsa_outputs[-4 if self._features else -3:]:
                b.bind_output(name, "cpu")
            try:
                session.run_with_iobinding(b)  # K/V written into the cache in place
            except Exception as exc:
                raise run_error(exc, self._dhsa_spec.file) from None
            outputs = dict(zip(self._dhsa_outputs, b.get_outputs()))
            starts[start:end] = outputs["chunk_starts"].numpy()
            if self._features:
                features.append(outputs["features"].numpy()[0])
        return StepOutputs(logits=outputs["logits"].numpy()[0],
                           hidden=outputs["hidden"].numpy()[0],
                           features=np.concatenate(features) if features else None)

    def forward(self, step: StepInputs) -> StepOutputs:
        q = step.input_ids.shape[1]
        total = step.past_len + q
        b = self.binding
        b.bind_cpu_input("input_ids", step.input_ids)
        b.bind_cpu_input("position_ids", step.position_ids)
        b.bind_cpu_input("tree_mask", step.tree_mask)
        b.bind_cpu_input("logits_index", step.logits_index)
        b.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        b.bind_output("logits", "cpu")
        b.bind_output("hidden", "cpu")
        if self._features:
            b.bind_output("features", "cpu")
        try:
            self.session.run_with_iobinding(b)
        except Exception as exc:  # ORT's own Fail/InvalidArgument/RuntimeException types
            raise run_error(exc, self._graph_file) from None
        outputs = bound_outputs(b)
        features = outputs[self._features_index].numpy()[0] if self._features else None
        return StepOutputs(logits=outputs[0].numpy()[0], hidden=outputs[1].numpy()[0],
                           features=features)

    # -- the draft layer ------------------------------------------------------------------
    @property
    def has_draft(self) -> bool:
        return self._draft_spec is not None

    @property
    def draft_cache(self) -> KVCache | None:
        """The draft layer's own cache, beside the backbone's: allocated once, when drafting
        first needs it (with the draft's session), so a process that never drafts (plain or
        Medusa decoding) holds none of it; fixed from then on."""
        if self._draft_cache is None and self._draft_spec is not None:
            self._draft_cache = KVCache(self._draft_cache_spec)
        return self._draft_cache

    @property
    def draft_session(self):
        """The draft layer's session (opened on first use), its cache bound in place."""
        if self._draft_session is None and self._draft_spec is not None:
            session = _session(self._path / self._draft_spec.file, self.device, self._threads,
                               spin=False, sha256=self._digest(self._draft_spec.file))
            import onnxruntime as ort

            binding = session.io_binding()
            for name, buffer in (("key", self.draft_cache.keys[0]),
                                 ("value", self.draft_cache.values[0])):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(f"draft_past_{name}", value)
                binding.bind_ortvalue_output(f"draft_present_{name}", value)
            self._draft_binding = binding
            self._draft_session = session
        return self._draft_session

    def draft_forward(self, input_ids: np.ndarray, features: np.ndarray,
                      position_ids: np.ndarray, tree_mask: np.ndarray,
                      logits_index: np.ndarray, past_len: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One draft call of q rows after ``past_len`` draft-cache entries (written at
        [past_len, past_len + q)): (top-k ids [1,n,k], their log-probabilities [1,n,k], the
        draft's features [1,n,H]) for the rows ``logits_index``. ``tree_mask``: [1,1,q,q], or
        [1,1,q,w] over the last w entries (q <= w <= past_len + q; those before visible)."""
        session = self.draft_session
        b = self._draft_binding
        total = past_len + input_ids.shape[1]
        b.bind_cpu_input("input_ids", input_ids)
        b.bind_cpu_input("features", np.ascontiguousarray(features, dtype=np.float32))
        b.bind_cpu_input("position_ids", position_ids)
        b.bind_cpu_input("tree_mask", tree_mask)
        b.bind_cpu_input("logits_index", logits_index)
        b.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        for name in ("draft_topk_ids", "draft_topk_logprobs", "draft_hidden"):
            b.bind_output(name, "cpu")
        try:
            session.run_with_iobinding(b)
        except Exception as exc:
            raise run_error(exc, self._draft_spec.file) from None
        outputs = bound_outputs(b)  # the presents first (bound first), then these three
        return outputs[2].numpy(), outputs[3].numpy(), outputs[4].numpy()
