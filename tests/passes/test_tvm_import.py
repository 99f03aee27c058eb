"""Guard of the TVM path: model.onnx imports into Relax, builds for llvm, matches ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgert.runtime.steps import causal_mask

tvm = pytest.importorskip("tvm")


def test_portable_graph_builds_for_llvm_and_matches_ort(tiny_artifact):
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(tiny_artifact / "model.onnx"))
    mod = from_onnx(model, keep_params_in_input=False)
    executable = tvm.compile(mod, tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    vm = relax.VirtualMachine(executable, tvm.cpu())

    rng = np.random.default_rng(0)
    q, past = 4, 3
    feeds = {"input_ids": rng.integers(0, 300, (1, q)),
             "position_ids": np.arange(past, past + q)[None],
             "tree_mask": causal_mask(q), "logits_index": np.arange(q, dtype=np.int64)}
    for inp in model.graph.input:
        if inp.name.startswith("past_"):
            feeds[inp.name] = rng.standard_normal((1, 2, past, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(tiny_artifact / "model.onnx")).run(None, feeds)
    got = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input])
    for i, (want, have) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(have.numpy(), want, atol=1e-5, err_msg=f"output {i}")
