"""Load-time checks (#24): a manifest that contradicts its graphs, an unknown KV dtype, a KV
cache that does not fit memory and a chat template that fails to render each end in a
one-line EdgertError naming the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import edgert
from edgert.artifact.manifest import MANIFEST_NAME, KVCacheSpec
from edgert.errors import ArtifactError, CapacityError, ConfigError, GenerationError


def edited(source: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``source`` whose manifest ``edit(document)`` changed."""
    dst = tmp_path / "edited"
    shutil.copytree(source, dst)
    manifest = dst / MANIFEST_NAME
    document = json.loads(manifest.read_text())
    edit(document)
    manifest.write_text(json.dumps(document))
    return dst


def setting(section: str, name: str, value):
    def edit(document):
        document[section][name] = value

    return edit


def refused(path: Path, error=ArtifactError, verify: bool | str = True) -> str:
    with pytest.raises(error) as info:
        edgert.load(path, verify=verify)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("section, name, value, expected", [
    ("config", "num_key_value_heads", 4, "manifest config num_key_value_heads=4 contradicts "
     "the graph (past_key_0 of model.onnx has 2 KV heads); re-export the artifact"),
    ("config", "head_dim", 8, "manifest config head_dim=8 contradicts the graph (past_key_0 "
     "of model.onnx has a head size of 16)"),
    ("config", "num_hidden_layers", 3, "manifest config num_hidden_layers=3 contradicts the "
     "graph (model.onnx has 2 layers of past_key inputs)"),
    ("config", "vocab_size", 500, "manifest config vocab_size=500 contradicts the graph "
     "(logits of model.onnx has 384)"),
    ("config", "hidden_size", 128, "manifest config hidden_size=128 contradicts the graph "
     "(hidden of model.onnx has 64)"),
    # not in the manifest's tensor specs: read from the ONNX file's attention node
    ("config", "num_attention_heads", 8, "manifest config num_attention_heads=8 contradicts "
     "the graph (model.ort.onnx's attention has 4 heads)"),
    ("kv_cache", "num_kv_heads", 3, "manifest kv_cache.num_kv_heads=3 contradicts the graph "
     "(past_key_0 of model.onnx has 2 KV heads)"),
    ("kv_cache", "head_dim", 32, "manifest kv_cache.head_dim=32 contradicts the graph"),
    ("kv_cache", "num_layers", 1, "manifest kv_cache.num_layers=1 contradicts the graph"),
    ("kv_cache", "capacity", 4096, "kv_cache.capacity=4096 exceeds the model's maximum "
     "context 1024"),
    ("kv_cache", "dtype", "float16", "manifest kv_cache.dtype=float16 contradicts the graph "
     "(past_key_0 of model.ort.onnx is float32)"),
])
def test_a_config_that_contradicts_the_graph_is_refused_naming_the_field(
        tiny_artifact, tmp_path, section, name, value, expected):
    path = edited(tiny_artifact, tmp_path, setting(section, name, value))
    assert expected in refused(path, verify=False)


def test_graph_specs_that_contradict_the_onnx_file_are_refused(tiny_artifact, tmp_path):
    """A manifest edited consistently (config, kv_cache and every graph spec say 4 KV heads)
    still contradicts what model.ort.onnx itself declares."""
    def four_kv_heads(document):
        document["config"]["num_key_value_heads"] = document["kv_cache"]["num_kv_heads"] = 4
        for graph in document["graphs"].values():
            for tensor in graph["inputs"] + graph["outputs"]:
                if tensor["name"].startswith(("past_", "present_")):
                    tensor["shape"][1] = 4

    message = refused(edited(tiny_artifact, tmp_path, four_kv_heads), verify=False)
    assert ("graphs.ort_gqa past_key_0 float32 [1, 4, capacity, 16] contradicts "
            "model.ort.onnx, which declares float32 [1, 2, capacity, 16]; re-export") in message

    def no_tree_mask(document):
        inputs = document["graphs"]["ort_gqa"]["inputs"]
        inputs[:] = [t for t in inputs if t["name"] != "tree_mask"]

    shutil.rmtree(tmp_path / "edited")
    message = refused(edited(tiny_artifact, tmp_path, no_tree_mask))
    assert "graphs.ort_gqa inputs contradict model.ort.onnx" in message
    assert "differing: 'tree_mask'" in message


def test_a_damaged_graph_file_is_refused_without_verification(tiny_artifact, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("EDGERT_ORT_CACHE", "0")
    path = tmp_path / "copy"
    shutil.copytree(tiny_artifact, path)
    graph = path / "model.ort.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[:len(data) // 2])
    assert "is not a readable ONNX graph" in refused(path, verify=False)
    graph.write_bytes(b"")
    assert "is not a readable ONNX graph (empty file)" in refused(path, verify=False)
    graph.unlink()
    assert "model.ort.onnx is missing" in refused(path, verify=False)


def test_the_medusa_section_must_fit_the_heads_graph(tiny_medusa_artifact, tmp_path):
    path = edited(tiny_medusa_artifact, tmp_path, setting("medusa", "topk", 8))
    assert ("manifest medusa.topk=8 contradicts the graph (medusa_topk_ids has 4)"
            in refused(path, verify=False))
    shutil.rmtree(path)
    path = edited(tiny_medusa_artifact, tmp_path, setting("medusa", "num_heads", 5))
    assert "manifest medusa.num_heads=5 contradicts the graph" in refused(path)
    shutil.rmtree(path)
    path = edited(tiny_medusa_artifact, tmp_path, lambda d: d.update(medusa=None))
    assert "has a Medusa heads graph but no 'medusa' section" in refused(path)


@pytest.mark.parametrize("section, name, value, expected", [
    ("kv_cache", "capacity", "768", "field kv_cache.capacity must be an integer, got '768' "
     "(str); re-export the artifact"),
    ("kv_cache", "capacity", 768.5, "field kv_cache.capacity must be an integer"),
    ("config", "rms_norm_eps", "small", "field config.rms_norm_eps must be a number"),
    ("tokenizer", "eos_token_ids", None, "field tokenizer.eos_token_ids must be a list of "
     "integers, got None"),
    ("graphs", "portable", [], "graphs.portable must be a JSON object, got [] (list)"),
])
def test_fields_of_the_wrong_type_are_named(tiny_artifact, tmp_path, section, name, value,
                                            expected):
    assert expected in refused(edited(tiny_artifact, tmp_path, setting(section, name, value)))


def test_missing_sections_are_named(tiny_artifact, tmp_path):
    path = edited(tiny_artifact, tmp_path, lambda d: d.pop("kv_cache"))
    assert "the manifest lacks the field(s) ['kv_cache']" in refused(path)


def test_an_unknown_kv_dtype_is_an_artifact_error(tiny_artifact, tmp_path):
    path = edited(tiny_artifact, tmp_path, setting("kv_cache", "dtype", "bfloat8"))
    assert ("kv_cache.dtype 'bfloat8' is not a KV cache type edgert knows (float32, float16); "
            "re-export the artifact") in refused(path)
    from edgert.runtime.kv_cache import KVCache

    with pytest.raises(ArtifactError, match="kv_cache.dtype 'int4'"):
        KVCache(KVCacheSpec(16, 1, 1, 2, dtype="int4"))


def test_a_kv_cache_that_does_not_fit_memory_is_a_capacity_error(tiny_artifact, tmp_path,
                                                                 monkeypatch):
    from edgert.runtime import kv_cache

    # far more than any machine has (2 x 2 layers x 2 heads x 10^12 x 16 x 4 bytes): refused
    # before any allocation (an oversized mapping would be OOM-killed, not fail)
    huge = KVCacheSpec(capacity=10**12, num_layers=2, num_kv_heads=2, head_dim=16)
    with pytest.raises(CapacityError, match=r"the KV cache needs 476837\.2 GiB for "
                       r"1000000000000 tokens but .* of memory is available; re-export with "
                       r"a smaller --max-context"):
        kv_cache.KVCache(huge)

    monkeypatch.setattr(kv_cache, "available_memory", lambda: 100 << 10)  # 100 KiB
    message = refused(tiny_artifact, CapacityError)
    assert "the KV cache needs 0.4 MiB for 768 tokens but 0.1 MiB" in message
    monkeypatch.undo()

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(kv_cache, "aligned_zeros", no_memory)
    assert ("cannot allocate the KV cache (0.4 MiB for 768 tokens: MemoryError); free memory, "
            "or re-export with a smaller --max-context") in refused(tiny_artifact, CapacityError)


@pytest.mark.parametrize("template, expected", [
    ("{{ messages.nothing.deeper }}", "UndefinedError: 'list object' has no attribute "
     "'nothing'"),
    ("{{ messages + 1 }}", "TypeError: can only concatenate list"),
    ("{% for m in messages %}{{ m['content'] / 2 }}{% endfor %}", "TypeError"),
])
def test_a_chat_template_that_fails_to_render_is_a_generation_error(tiny_artifact, tmp_path,
                                                                    template, expected):
    path = edited(tiny_artifact, tmp_path, setting("tokenizer", "chat_template", template))
    engine = edgert.load(path)
    with pytest.raises(GenerationError) as info:
        engine.generate("hello", max_new_tokens=2)
    message = str(info.value)
    assert "the artifact's chat template failed on these messages" in message
    assert expected in message and "\n" not in message
    # raw prompts do not use the template
    assert engine.generate("hello", max_new_tokens=2, chat=False).output_ids


def test_raise_exception_in_a_template_stays_the_templates_message(tiny_artifact, tmp_path):
    template = "{{ raise_exception('only user messages, please') }}"
    engine = edgert.load(edited(tiny_artifact, tmp_path,
                                setting("tokenizer", "chat_template", template)))
    with pytest.raises(GenerationError, match="the chat template refused the messages: only "
                       "user messages, please$"):
        engine.generate("hello", max_new_tokens=2)


def test_a_template_that_does_not_parse_is_one_line(tiny_artifact, tmp_path):
    path = edited(tiny_artifact, tmp_path,
                  setting("tokenizer", "chat_template", "line one\n{% for %}\nline three"))
    assert "chat template does not parse" in refused(path)


def test_dhsa_settings_of_the_wrong_type_are_named(tiny_dhsa_artifact, tmp_path):
    def edit(document):
        document["dhsa"]["budget"] = "64"

    with pytest.raises(ConfigError, match=r"field dhsa\.budget must be an integer, got '64'"):
        edgert.load(edited(tiny_dhsa_artifact, tmp_path, edit))


def test_a_tokenizer_file_that_makes_tokenizers_panic_is_an_artifact_error(tiny_artifact,
                                                                          tmp_path):
    """Well-formed JSON the `tokenizers` parser panics on (a BPE subword prefix longer than
    the merged pieces): pyo3's PanicException is a BaseException, not an Exception."""
    path = tmp_path / "copy"
    shutil.copytree(tiny_artifact, path)
    tokenizer = path / "tokenizer.json"
    document = json.loads(tokenizer.read_text())
    document["model"]["continuing_subword_prefix"] = "x" * 16
    tokenizer.write_text(json.dumps(document))
    message = refused(path, verify=False)
    assert "cannot load" in message and "tokenizer.json" in message and "re-export" in message
