"""Give back the resident pages of a memory-mapped weights file once a session has loaded it.

ONNX Runtime maps each initializer of a cached, pre-packed graph (``ort_cache``) from its
external data file and reads every page while it creates the session. Afterwards the process
keeps all of them resident, including pages no step reads again: most of the token embedding
(a step gathers a handful of its rows) and original-layout tensors whose packed copies are what
the kernels use (SmolLM2's default artifact: README, Footprint).

After the session is created, ``release_clean_pages`` tells the kernel (``madvise
MADV_DONTNEED``) that the process no longer needs the file's pages. Only mappings with no
anonymous page are released: a private mapping's page becomes anonymous when the process
writes to it (copy on write), so the pages of the others are the page cache's, the file's own
bytes, and a later read faults the same bytes back in (a minor fault, no disk read while the
file stays cached); a mapping ONNX Runtime wrote to is left alone. The first decode step
brings back the pages it reads, and RSS settles at what the steps actually touch.

Linux only (``/proc/self/smaps``); elsewhere, or with ``EDGERT_RELEASE_PAGES=0``, it does
nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

MADV_DONTNEED = 4
SMAPS = "/proc/self/smaps"


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    rss_kb: int
    anonymous_kb: int


def enabled() -> bool:
    return (sys.platform.startswith("linux") and os.path.exists(SMAPS)
            and os.environ.get("EDGERT_RELEASE_PAGES", "1") != "0")


def file_mappings(path: Path, smaps: str = SMAPS) -> list[Mapping]:
    """This process's mappings of ``path`` (resolved), with their resident kilobytes and those
    the process wrote to (private copies)."""
    wanted = str(Path(path).resolve())
    found: list[Mapping] = []
    current: dict | None = None
    with open(smaps) as lines:
        for line in lines:
            key, _, rest = line.partition(" ")
            if not key.endswith(":"):  # a mapping's header: "start-end perms offset dev inode path"
                if current is not None:
                    found.append(Mapping(**current))
                fields = rest.split(None, 4)
                start, _, end = key.partition("-")
                current = ({"start": int(start, 16), "end": int(end, 16), "rss_kb": 0,
                            "anonymous_kb": 0}
                           if len(fields) == 5 and fields[4].rstrip("\n") == wanted else None)
            elif current is not None and key == "Rss:":
                current["rss_kb"] = int(rest.split()[0])
            elif current is not None and key == "Anonymous:":
                current["anonymous_kb"] = int(rest.split()[0])
    if current is not None:
        found.append(Mapping(**current))
    return found


def release_clean_pages(path: Path) -> int:
    """Drop this process's resident pages of ``path`` wherever its mappings are clean; returns
    the bytes released (0 where the platform has no smaps or the release is turned off)."""
    if not enabled():
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for mapping in file_mappings(path):
        if mapping.anonymous_kb or not mapping.rss_kb:
            continue
        if libc.madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
            released += mapping.rss_kb * 1024
    return released
