"""Export at scale (slow, ~10 min): a random-weight model of TinyLlama-1.1B's shape from an fp16
HF directory. The fp32 artifact is over 2 GB and its greedy ids equal transformers'; the q4
artifact exports and runs; export stays near two copies of the fp32 weights in memory.
The figures are recorded by ``python -m bench.large_export``."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

FP32_WEIGHTS_MB = 1_100_048_384 * 4 / 2**20  # the shape's parameters in fp32


def test_large_model_exports_with_bounded_memory(tmp_path):
    import json

    from bench import large_export

    source = large_export.build_source(tmp_path / "source")
    fp32 = large_export.measure(source, tmp_path / "fp32", "fp32", tokens=4)
    q4 = large_export.measure(source, tmp_path / "q4", "q4", tokens=4)
    assert (tmp_path / "fp32" / "model.onnx.data").stat().st_size > 2 * 2**30
    assert fp32["export_peak_rss_mb"] < 2.5 * FP32_WEIGHTS_MB
    assert q4["artifact_mb"] < fp32["artifact_mb"] / 4
    stdout, _, _ = large_export.run_measured(large_export.python(
        large_export.TRANSFORMERS_GREEDY, str(source), json.dumps(fp32["prompt_ids"]), "4"))
    assert fp32["output_ids"] == json.loads(stdout.strip().splitlines()[-1])
    assert len(q4["output_ids"]) == 4
