"""Engine end to end on the tiny model: greedy equals transformers, streaming, fixed cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgert
from edgert.errors import CapacityError, GenerationError

CHAT_PROMPTS = [
    "What is a function?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain loops."}],
    "Write a haiku about the sea",
]


def hf_greedy(model, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("prompt", CHAT_PROMPTS)
def test_greedy_matches_transformers_generate(tiny_engine, tiny_reference, prompt):
    result = tiny_engine.generate(prompt, max_new_tokens=64)
    eos = tiny_engine.manifest.tokenizer.eos_token_ids[0]
    assert result.output_ids == hf_greedy(tiny_reference, result.prompt_ids, 64, eos)


def test_chat_template_matches_transformers(tiny_engine, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    for prompt in CHAT_PROMPTS:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert tiny_engine.encode(prompt) == list(expected)


def test_stream_yields_the_generated_text(tiny_engine):
    result = tiny_engine.generate("Tell me about classes", max_new_tokens=40)
    stats = {}
    pieces = list(tiny_engine.stream("Tell me about classes", max_new_tokens=40, stats=stats))
    assert "".join(pieces) == result.text
    assert stats["new_tokens"] == len(result.output_ids)


def test_stats_fields(tiny_engine):
    stats = tiny_engine.generate("hello", max_new_tokens=8).stats
    assert set(stats) >= {"prefill_ms", "decode_tokens_per_s", "new_tokens", "kv_capacity",
                          "kv_bytes"}
    assert stats["kv_capacity"] == tiny_engine.cache.capacity
    assert stats["kv_bytes"] == tiny_engine.cache.nbytes == tiny_engine.manifest.kv_cache.bytes


def test_raw_prompt_has_no_template(tiny_engine):
    ids = tiny_engine.encode("plain text", chat=False)
    assert tiny_engine.tokenizer.decode(ids, skip_special_tokens=False) == "plain text"


def test_sampling_is_deterministic_under_seed(tiny_engine):
    a = tiny_engine.generate("Say something", max_new_tokens=20, temperature=0.8, top_p=0.9,
                             seed=7)
    b = tiny_engine.generate("Say something", max_new_tokens=20, temperature=0.8, top_p=0.9,
                             seed=7)
    assert a.output_ids == b.output_ids


def test_kv_buffer_is_the_same_object_after_500_tokens(tiny_engine):
    cache = tiny_engine.cache
    storage, pointer, size = cache.storage, cache.storage.ctypes.data, cache.nbytes
    keys = list(cache.keys)
    # raw prompt, sampled so EOS is unlikely to stop it early; 500 new tokens
    result = tiny_engine.generate("the", max_new_tokens=500, temperature=1.0, seed=3, chat=False)
    eos = set(tiny_engine.manifest.tokenizer.eos_token_ids)
    assert len(result.output_ids) == 500 or result.output_ids[-1] in eos
    assert cache.storage is storage and cache.storage.ctypes.data == pointer
    assert cache.nbytes == size and all(a is b for a, b in zip(keys, cache.keys))
    assert cache.length == len(result.prompt_ids) + len(result.output_ids) - 1


def test_capacity_refused_up_front(tiny_engine):
    with pytest.raises(CapacityError, match="exceeds the KV capacity"):
        tiny_engine.generate("hello", max_new_tokens=tiny_engine.cache.capacity)


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "   "}, "empty"),
    ({"prompt": []}, "no messages"),
    ({"prompt": [{"role": "user"}]}, "role' and 'content'"),
    ({"prompt": "hi", "temperature": -1.0}, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_requests_are_refused(tiny_engine, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        tiny_engine.generate(**kwargs)


def test_unknown_backend_and_device(tiny_artifact):
    with pytest.raises(edgert.BackendError, match="unknown backend"):
        edgert.load(tiny_artifact, backend="nope", verify=False)
    with pytest.raises(edgert.BackendError, match="device"):
        edgert.load(tiny_artifact, device="tpu", verify=False)


def test_eos_stops_generation(tiny_engine):
    """Force EOS: the engine stops right after emitting it."""
    eos = tiny_engine.manifest.tokenizer.eos_token_ids[0]
    backend = tiny_engine.backend
    original = backend.forward

    def forward_with_eos(step):
        out = original(step)
        if step.past_len >= 1 and step.input_ids.shape[1] == 1:
            out.logits[:] = -1e9
            out.logits[:, eos] = 0.0
        return out

    backend.forward = forward_with_eos
    try:
        result = tiny_engine.generate("hello", max_new_tokens=50)
    finally:
        backend.forward = original
    assert result.output_ids[-1] == eos and len(result.output_ids) == 2
    assert np.isfinite(result.stats["decode_tokens_per_s"])
