"""ONNX Runtime on CUDA keeps the KV cache on the device, by design: checked here without a GPU
by running the backend's own allocation and binding code against a recording stand-in for
onnxruntime's OrtValue and IOBinding (scripts/gpu_check.sh runs the real thing on a GPU).

Every ``past_*``/``present_*`` binding must be a device OrtValue bound once at load, in place
(the same value as input and output), and a decode step must bind only its small inputs and
the logits/hidden outputs: no capacity-sized host array, no read-back of the cache."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import edgert
from edgert.errors import BackendError
from edgert.runtime.backends import StepInputs
from edgert.runtime.backends import ort as ort_backend
from edgert.runtime.backends.ort_device_cache import OrtDeviceKVCache
from edgert.runtime.steps import causal_mask


class DeviceValue:
    def __init__(self, shape, dtype, device, device_id) -> None:
        self.shape, self.dtype, self.device, self.device_id = shape, dtype, device, device_id

    def device_name(self) -> str:
        return self.device

    def numpy(self):
        raise AssertionError("the cache was read back to the host")


class RecordingOrt:
    """onnxruntime's OrtValue factory, recording what it allocates."""

    def __init__(self, fail: bool = False) -> None:
        self.allocated = []
        self.fail = fail

        def from_shape_and_type(shape, dtype, device, device_id):
            if self.fail:
                raise RuntimeError("CUDA failure 2: out of memory")
            value = DeviceValue(shape, dtype, device, device_id)
            self.allocated.append(value)
            return value

        self.OrtValue = SimpleNamespace(ortvalue_from_shape_and_type=from_shape_and_type,
                                        ortvalue_from_numpy=self._no_host_copy)

    @staticmethod
    def _no_host_copy(array):
        raise AssertionError("a host array was wrapped for the cache")


class RecordingBinding:
    def __init__(self, logits_shape, hidden_shape) -> None:
        self.calls = []
        self.shapes = (logits_shape, hidden_shape)

    def __getattr__(self, method):
        if not method.startswith("bind_"):
            raise AttributeError(method)
        return lambda name, value=None, *rest: self.calls.append((method, name, value))

    def get_outputs(self):
        n = 1
        return [SimpleNamespace(numpy=lambda s=s: np.zeros((1, n, s[-1]), np.float32))
                for s in self.shapes]


@pytest.fixture()
def cuda_backend(tiny_artifact, monkeypatch):
    manifest = edgert.load(tiny_artifact).manifest
    config = manifest.config
    binding = RecordingBinding((1, 1, config.vocab_size), (1, 1, config.hidden_size))
    session = SimpleNamespace(io_binding=lambda: binding, run_with_iobinding=lambda b: None)
    monkeypatch.setattr(ort_backend, "_session", lambda *args, **kwargs: session)
    fake = RecordingOrt()
    real_allocate = ort_backend._allocate_cache
    monkeypatch.setattr(ort_backend, "_allocate_cache",
                        lambda spec, device, ort: real_allocate(spec, device, fake))
    backend = ort_backend.OrtBackend(tiny_artifact, manifest, device="cuda")
    return backend, binding, fake, manifest


def test_cache_is_allocated_on_the_device_and_bound_in_place(cuda_backend):
    backend, binding, fake, manifest = cuda_backend
    kv = manifest.kv_cache
    assert isinstance(backend.cache, OrtDeviceKVCache)
    assert len(fake.allocated) == 2 * kv.num_layers
    assert all(v.device == "cuda" and v.shape == [1, kv.num_kv_heads, kv.capacity, kv.head_dim]
               for v in fake.allocated)
    bound = {(m, n): v for m, n, v in binding.calls if n.startswith(("past_", "present_"))}
    for layer in range(kv.num_layers):
        for kind in ("key", "value"):
            value = bound[("bind_ortvalue_input", f"past_{kind}_{layer}")]
            assert value.device_name() == "cuda"
            assert bound[("bind_ortvalue_output", f"present_{kind}_{layer}")] is value


def test_a_step_binds_only_its_small_inputs(cuda_backend):
    backend, binding, _, manifest = cuda_backend
    binding.calls.clear()
    backend.forward(StepInputs(np.array([[5]]), np.array([[0]]), causal_mask(1),
                               np.array([0]), 0))
    names = {name for _, name, _ in binding.calls}
    assert not any(n.startswith(("past_", "present_")) for n in names)
    for method, name, value in binding.calls:
        if method == "bind_cpu_input":
            assert np.asarray(value).nbytes < 1024, name  # never a cache-sized array
        else:
            assert (method, name) in {("bind_output", "logits"), ("bind_output", "hidden")}
            assert value == "cpu"


def test_device_cache_refuses_moves_and_the_engine_verifies_chains(tiny_medusa_artifact,
                                                                   monkeypatch):
    from edgert.artifact.manifest import KVCacheSpec

    cache = OrtDeviceKVCache(KVCacheSpec(16, 2, 2, 8), ort_module=RecordingOrt())
    cache.advance(2)
    with pytest.raises(BackendError, match="verify chains"):
        cache.commit_path(np.array([1]))
    cache.commit_path(np.array([0, 1]))  # an accepted chain prefix is already in place
    assert cache.length == 4
    with pytest.raises(BackendError, match="smaller --max-context"):
        OrtDeviceKVCache(KVCacheSpec(16, 2, 2, 8), ort_module=RecordingOrt(fail=True))
    # the Engine's step trees: Medusa's tree merged with lookup's chain branches; on a cache
    # that cannot move entries, a chain
    engine = edgert.load(tiny_medusa_artifact)
    medusa = engine.manifest.medusa
    head_ids = np.arange(medusa["num_heads"] * medusa["topk"]).reshape(
        medusa["num_heads"], medusa["topk"]) + 20
    branching = engine._step_tree(5, head_ids, _Lookup([7, 8, 9]))
    assert branching.buffers.parents.tolist() != list(range(-1, branching.size - 1))
    monkeypatch.setattr(engine.cache, "can_move_entries", False, raising=False)
    chain = engine._step_tree(5, head_ids, _Lookup([7, 8, 9]))
    assert chain.buffers.parents.tolist() == list(range(-1, chain.size - 1))


class _Lookup:
    def __init__(self, chain) -> None:
        self.chain = chain

    def propose(self):
        return list(self.chain)
