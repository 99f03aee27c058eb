"""ONNX Runtime sessions from the optimized, pre-packed graph cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

import edgert
from edgert.runtime.backends import ort_cache

PROMPT = "the cache keeps the packed weights"


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGERT_ORT_CACHE", raising=False)
    return tmp_path / "cache" / "ort"


def entries(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".")) \
        if cache_dir.exists() else []


def generate(path):
    return edgert.load(path).generate(PROMPT, max_new_tokens=12, chat=False, medusa=False)


def test_first_load_fills_the_cache_and_later_loads_read_it(tiny_artifact, cache_dir,
                                                            monkeypatch):
    first = generate(tiny_artifact)
    (entry,) = entries(cache_dir)
    assert (entry / ort_cache.COMPLETE).is_file() and (entry / ort_cache.GRAPH).is_file()
    modified = os.stat(entry / ort_cache.GRAPH).st_mtime_ns
    second = generate(tiny_artifact)
    assert second.output_ids == first.output_ids
    assert os.stat(entry / ort_cache.GRAPH).st_mtime_ns == modified  # read, not rewritten
    monkeypatch.setenv("EDGERT_ORT_CACHE", "0")
    assert generate(tiny_artifact).output_ids == first.output_ids


def test_the_cached_session_computes_what_the_graph_does(tiny_artifact, cache_dir):
    ids = list(range(3, 40))
    uncached = edgert.load(tiny_artifact)  # fills the cache (its own session is a fresh one)
    cached = edgert.load(tiny_artifact)
    np.testing.assert_allclose(cached.logprobs(ids), uncached.logprobs(ids), atol=1e-5)


def test_a_damaged_entry_is_rebuilt(tiny_artifact, cache_dir):
    want = generate(tiny_artifact).output_ids
    (entry,) = entries(cache_dir)
    (entry / ort_cache.GRAPH).write_bytes(b"not a graph")
    assert generate(tiny_artifact).output_ids == want
    (entry,) = entries(cache_dir)
    assert (entry / ort_cache.GRAPH).stat().st_size > 100


def test_the_key_follows_the_graph_and_the_machine(monkeypatch):
    key = ort_cache.cache_key("a" * 64)
    assert key == ort_cache.cache_key("a" * 64) and key != ort_cache.cache_key("b" * 64)
    monkeypatch.setattr(ort_cache, "cpu_identity", lambda: "another cpu")
    assert ort_cache.cache_key("a" * 64) != key


def test_an_unwritable_cache_falls_back_to_a_plain_session(tiny_artifact, tmp_path,
                                                           monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("EDGERT_CACHE_DIR", str(blocked))
    assert generate(tiny_artifact).output_ids


def test_same_graph_other_weights_is_another_entry(tiny_dir, tmp_path, cache_dir):
    """Two exports whose graphs are byte-identical but whose weights differ must not share a
    cache entry (the key covers the weights file)."""
    import dataclasses

    import torch

    from edgert.export.exporter import ExportOptions, export_loaded
    from edgert.model.sources import load_model

    loaded = load_model(str(tiny_dir))
    state = {k: (v * 1.5 if "mlp" in k else v) for k, v in loaded.state_dict.items()}
    other = dataclasses.replace(loaded, state_dict={k: torch.as_tensor(v)
                                                    for k, v in state.items()})
    options = ExportOptions(max_context=128, dhsa=None, use_heads=False)
    a, b = tmp_path / "a", tmp_path / "b"
    export_loaded(loaded, a, options, log=lambda m: None)
    export_loaded(other, b, options, log=lambda m: None)
    assert (a / "model.ort.onnx").read_bytes() == (b / "model.ort.onnx").read_bytes()
    ids = list(range(3, 30))
    first, second = edgert.load(a).logprobs(ids), edgert.load(b).logprobs(ids)
    assert not np.allclose(first, second)
    assert len(entries(cache_dir)) == 2
    from_cache = edgert.load(b).logprobs(ids)  # from the cache: still b's weights
    np.testing.assert_allclose(from_cache, second, atol=1e-6)


def test_the_least_recently_used_entries_go_beyond_the_size_limit(tmp_path):
    root = tmp_path / "ort"
    for i, name in enumerate(["old", "mid", "new"]):
        entry = root / name
        entry.mkdir(parents=True)
        (entry / ort_cache.DATA).write_bytes(b"x" * 1000)
        (entry / ort_cache.COMPLETE).write_text("sha\n")
        os.utime(entry / ort_cache.COMPLETE, (1000 + i, 1000 + i))
    ort_cache.prune(root, keep=root / "new", limit=2100)
    assert sorted(p.name for p in root.iterdir()) == ["mid", "new"]


def test_a_cached_session_gives_back_its_mapped_weight_pages(tiny_artifact, cache_dir,
                                                             monkeypatch):
    from edgert.runtime.backends.page_release import file_mappings

    ids = list(range(3, 40))
    want = edgert.load(tiny_artifact).logprobs(ids)  # fills the cache
    (entry,) = entries(cache_dir)
    data = entry / ort_cache.DATA

    def resident_kb():
        return sum(m.rss_kb for m in file_mappings(data))

    monkeypatch.setenv("EDGERT_RELEASE_PAGES", "0")
    kept = edgert.load(tiny_artifact)
    assert resident_kb() > 0  # ONNX Runtime maps the weights and reads them at load
    del kept
    monkeypatch.delenv("EDGERT_RELEASE_PAGES")
    released = edgert.load(tiny_artifact)
    assert file_mappings(data) and resident_kb() == 0
    np.testing.assert_allclose(released.logprobs(ids), want, atol=1e-5)  # faulted back in
    assert resident_kb() > 0
