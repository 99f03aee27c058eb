"""Full-model checks on SmolLM2-135M-Instruct (slow: `make test-slow`, not in CI)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "Give me three tips for better sleep.",
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why do cats purr?"}],
]


@pytest.fixture(scope="module")
def smollm2_artifact(tmp_path_factory):
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.export.quantize import WeightOptions

    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    # fp32 weights: greedy ids identical to transformers' (the default keeps the GGUF's blocks)
    export_model("smollm2-135m", out, ExportOptions(max_context=2048,
                                                    weights=WeightOptions(weights="fp32")),
                 log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def hf_model(smollm2_artifact):
    import edgert
    from bench import common

    return common.transformers_model_from_artifact(edgert.load(smollm2_artifact).manifest)


def test_weights_equal_transformers_gguf_loader(hf_model):
    from edgert.model.sources import load_model

    ours = load_model("smollm2-135m").state_dict
    theirs = hf_model.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name


def test_tokenizer_equals_transformers_gguf_tokenizer(smollm2_artifact):
    from transformers import AutoTokenizer

    import edgert
    from edgert.model.sources import REGISTERED_MODELS

    path = REGISTERED_MODELS["smollm2-135m"].locate()
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    engine = edgert.load(smollm2_artifact, verify=False)
    text = "Numbers 12345 and code: def f(x):\n    return x**2  # café ünïcode 日本"
    assert engine.tokenizer.encode_raw(text) == hf_tok.encode(text, add_special_tokens=False)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(expected, list):
            expected = expected["input_ids"]
        assert engine.encode(prompt) == expected


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_generate(smollm2_artifact, hf_model, prompt):
    import edgert

    engine = edgert.load(smollm2_artifact, verify=False)
    result = engine.generate(prompt, max_new_tokens=64)
    eos = engine.manifest.tokenizer.eos_token_ids
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([result.prompt_ids]), max_new_tokens=64,
                                do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    assert result.output_ids == out[0, len(result.prompt_ids):].tolist()
