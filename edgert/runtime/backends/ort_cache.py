"""ONNX Runtime sessions from a per-machine cache of optimized, pre-packed graphs.

Creating a session optimizes the graph and packs every MatMulNBits weight into MLAS's layout:
0.56 s for SmolLM2's q4 decoder here, most of the time to the first token, and each session
holds its own packed copy. The first load of a graph on a machine saves the optimized graph
with the packed weights in its external data (``session.save_external_prepacked_constant_
initializers``); later loads read that file, already optimized, and ONNX Runtime maps the
packed weights from it instead of packing them again (0.21 s), so sessions and processes
share them through the page cache. Once such a session is created, the pages of the file it
no longer reads are given back (``page_release``).

The packed layout depends on the CPU's instruction set and on ONNX Runtime's version, so the
cache key is the SHA-256 of the graph and of the weights file it reads (from the manifest: two
artifacts can have byte-identical graphs over different weights), ONNX Runtime's version and
the CPU's identity; a cache entry is written atomically (temp dir + rename) and one that
fails to load is removed and rebuilt. Location: ``$EDGERT_CACHE_DIR``, else
``$XDG_CACHE_HOME/edgert``, else ``~/.cache/edgert``, kept under ``MAX_CACHE_BYTES`` (the
least recently used entries go first; an entry is ~2x its graph's weights);
``EDGERT_ORT_CACHE=0`` turns it off (every load then optimizes and packs).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgert.runtime.backends.page_release import release_clean_pages

GRAPH = "graph.onnx"
DATA = "graph.onnx.data"
COMPLETE = "complete"
MAX_CACHE_BYTES = 4 << 30  # beyond this, the least recently used entries are removed


def cache_root() -> Path | None:
    if os.environ.get("EDGERT_ORT_CACHE", "1") == "0":
        return None
    explicit = os.environ.get("EDGERT_CACHE_DIR")
    if explicit:
        return Path(explicit) / "ort"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgert" / "ort"


def cpu_identity() -> str:
    """The CPU model and its feature flags (what MLAS picks its kernels and layouts by)."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags",
                                                               "Features"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_key(graph_sha256: str) -> str:
    import onnxruntime as ort

    text = "\n".join([graph_sha256, ort.__version__, cpu_identity()])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _save_options(options, directory: Path):
    options.optimized_model_filepath = str(directory / GRAPH)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     DATA)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers",
                                     "1")
    return options


def cached_session(graph: Path, graph_sha256: str | None, make_options: Callable,
                   providers: list[str]):
    """An InferenceSession of ``graph``: from the cache when it has this graph for this
    machine, else created normally (and, on the CPU, saved to the cache for next time).

    ``make_options()`` returns fresh SessionOptions (runtime settings: threads, spinning,
    memory pattern); the cached graph is loaded with optimizations off, as it is optimized.
    """
    import onnxruntime as ort

    root = cache_root()
    if root is None or graph_sha256 is None or providers[0] != "CPUExecutionProvider":
        return ort.InferenceSession(str(graph), make_options(), providers=providers)
    entry = root / cache_key(graph_sha256)
    if (entry / COMPLETE).is_file():
        os.utime(entry / COMPLETE)  # its last use, for pruning
        options = make_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(entry / GRAPH), options, providers=providers)
        except Exception:  # a damaged entry: rebuild it below
            shutil.rmtree(entry, ignore_errors=True)
        else:
            release_clean_pages(entry / DATA)
            return session
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    except OSError:  # a read-only home: no cache
        return ort.InferenceSession(str(graph), make_options(), providers=providers)
    try:
        session = ort.InferenceSession(str(graph), _save_options(make_options(), tmp),
                                       providers=providers)
        (tmp / COMPLETE).write_text(graph_sha256 + "\n")
        try:
            tmp.rename(entry)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
        prune(root, keep=entry)
        return session
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune(root: Path, keep: Path, limit: int = MAX_CACHE_BYTES) -> None:
    """Remove the least recently used entries until the cache holds at most ``limit`` bytes
    (``keep``, the entry just written, stays)."""
    entries = []
    for entry in root.iterdir():
        marker = entry / COMPLETE
        if entry == keep or not marker.is_file():
            continue
        size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        entries.append((marker.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries) + sum(
        f.stat().st_size for f in keep.iterdir() if f.is_file())
    for _, size, entry in sorted(entries):
        if total <= limit:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
