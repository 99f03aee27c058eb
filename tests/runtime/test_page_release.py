"""page_release: clean pages of a mapped weights file are given back and read back unchanged;
a mapping with privately written pages is never touched."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from edgert.runtime.backends.page_release import file_mappings, release_clean_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps")

PAGES = 64


@pytest.fixture
def weights_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, PAGES * mmap.PAGESIZE, dtype=np.uint8)
    path = tmp_path / "graph.onnx.data"
    path.write_bytes(data.tobytes())
    return path, data


def private_map(path):
    with open(path, "r+b") as f:  # as ONNX Runtime maps external data: private, writable
        return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)


def resident_kb(path) -> int:
    return sum(m.rss_kb for m in file_mappings(path))


def test_clean_mapping_is_released_and_reads_back_the_same(weights_file, monkeypatch):
    monkeypatch.delenv("EDGERT_RELEASE_PAGES", raising=False)
    path, data = weights_file
    view = private_map(path)
    assert np.frombuffer(view, np.uint8).sum() == data.sum()  # touch every page
    assert resident_kb(path) * 1024 == PAGES * mmap.PAGESIZE
    assert release_clean_pages(path) == PAGES * mmap.PAGESIZE
    assert resident_kb(path) == 0
    np.testing.assert_array_equal(np.frombuffer(view, np.uint8), data)
    assert resident_kb(path) * 1024 == PAGES * mmap.PAGESIZE
    view.close()


def test_mapping_with_written_pages_is_left_alone(weights_file, monkeypatch):
    monkeypatch.delenv("EDGERT_RELEASE_PAGES", raising=False)
    path, data = weights_file
    view = private_map(path)
    np.frombuffer(view, np.uint8).sum()
    view[5] = (int(data[5]) + 1) % 256  # a private copy of page 0: dropping it would lose the write
    (dirty,) = file_mappings(path)
    assert dirty.anonymous_kb > 0
    assert release_clean_pages(path) == 0
    assert view[5] == (int(data[5]) + 1) % 256
    assert resident_kb(path) * 1024 == PAGES * mmap.PAGESIZE
    view.close()


def test_other_files_and_turned_off(weights_file, tmp_path, monkeypatch):
    path, _ = weights_file
    view = private_map(path)
    np.frombuffer(view, np.uint8).sum()
    assert release_clean_pages(tmp_path / "other.data") == 0
    monkeypatch.setenv("EDGERT_RELEASE_PAGES", "0")
    assert release_clean_pages(path) == 0
    assert resident_kb(path) * 1024 == PAGES * mmap.PAGESIZE
    view.close()
