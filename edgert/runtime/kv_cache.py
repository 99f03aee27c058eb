"""The KV cache: one allocation at load, fixed capacity, written by index, never grown."""

from __future__ import annotations

import mmap

import numpy as np

from edgert.artifact.manifest import KVCacheSpec
from edgert.errors import ArtifactError, CapacityError

_DTYPES = {"float32": np.float32, "float16": np.float16}
ALIGNMENT = 64  # bytes; compiled kernels (TVM) assume 64-byte aligned buffers


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault every page of a range in, in one call


def aligned_zeros(shape: tuple[int, ...], dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """A zero-filled array whose data starts on an ``alignment``-byte boundary (NumPy only
    guarantees 16): vectorised kernels use aligned loads on it.

    Every page is taken now (memory is committed at load, not while decoding): an anonymous
    mapping (page-aligned, zeroed by the kernel) populated with one madvise call, 7x faster
    than touching the pages from NumPy (0.11 s against 0.77 s for SmolLM2's 377 MB cache
    here); where that call is missing, the pages are touched."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes and alignment <= mmap.PAGESIZE and hasattr(mmap.mmap, "madvise"):
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            region.madvise(MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: fault the pages in by writing them
            np.frombuffer(region, dtype=np.uint8)[::mmap.PAGESIZE] = 0
        return np.frombuffer(region, dtype=dtype).reshape(shape)
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    array = raw[start:start + nbytes].view(dtype).reshape(shape)
    array.fill(0)  # touch every page now: memory is taken at load, not while decoding
    return array


def available_memory() -> int:
    """Bytes of memory a new allocation can take now: available RAM (reclaimable page cache
    included) plus free swap. /proc/meminfo where there is one (0.1 ms; importing psutil
    takes 15), else psutil."""
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError, IndexError):
        import psutil

        return psutil.virtual_memory().available + psutil.swap_memory().free


def check_memory(spec: KVCacheSpec) -> None:
    """CapacityError when the cache would not fit the memory available now: every page is
    taken at load, and a mapping larger than that is killed by the kernel's OOM killer
    rather than failing."""
    available = available_memory()
    if spec.bytes > available:
        raise CapacityError(
            f"the KV cache needs {_size(spec.bytes)} for {spec.capacity} tokens but "
            f"{_size(available)} of memory is available; re-export with a smaller "
            "--max-context (or free memory)")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class KVCacheBase:
    """What the decode loop sees of a cache: ``length`` committed entries out of a fixed
    ``capacity``, per layer a key and a value buffer ``[Hkv, capacity, D]`` (where they live is
    the subclass's business: host memory for :class:`KVCache`, a TVM device for
    :class:`edgert.runtime.device_kv_cache.DeviceKVCache`).

    A forward writes its q new entries at ``[length, length + q)``; ``advance`` commits them as
    they are, ``commit_path`` moves a chosen subset (an accepted tree path) to the front of that
    region. Only those entries move.
    """

    can_move_entries = True  # commit_path can move a side branch's entries into place

    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    @property
    def nbytes(self) -> int:
        return self.spec.bytes

    def check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise CapacityError(
                f"{self.length} cached + {n} new tokens exceed the KV capacity "
                f"{self.capacity}; shorten the request or re-export with a larger --max-context")

    def advance(self, n: int) -> None:
        """Commit the n entries just written at [length, length + n)."""
        self.check_room(n)
        self.length += n

    def commit_path(self, offsets: np.ndarray) -> None:
        """Keep the entries at ``length + offsets`` (ascending), moved to
        ``[length, length + len(offsets))``, and commit them."""
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        count = len(offsets)
        if count and (offsets[0] < 0 or np.any(np.diff(offsets) <= 0)):
            # the in-place device copy relies on it (destination never past its source)
            raise ValueError(f"commit_path needs ascending non-negative offsets, got "
                             f"{offsets.tolist()}")
        self.check_room(int(offsets.max(initial=-1)) + 1)
        if not np.array_equal(offsets, np.arange(count)):  # an identity path moves nothing
            self._move(offsets)
        self.length += count

    def _move(self, offsets: np.ndarray) -> None:
        """Entry ``length + offsets[t]`` -> ``length + t`` in every buffer (offsets ascending,
        not the identity)."""
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` committed entries (a reused prefix); the rest are overwritten
        by the next forward."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate needs 0 <= n <= {self.length}, got {n}")
        self.length = n

    def reset(self) -> None:
        self.length = 0


class KVCache(KVCacheBase):
    """Host memory: per layer a key and a value buffer ``[1, Hkv, capacity, D]``, views of one
    array (shared zero-copy with ONNX Runtime and the TVM llvm build)."""

    def __init__(self, spec: KVCacheSpec) -> None:
        super().__init__(spec)
        if spec.dtype not in _DTYPES:
            raise ArtifactError(f"kv_cache.dtype {spec.dtype!r} is not one of "
                                f"{', '.join(_DTYPES)}; re-export the artifact")
        shape = (spec.num_layers, 2, 1, spec.num_kv_heads, spec.capacity, spec.head_dim)
        check_memory(spec)
        try:
            self._storage = aligned_zeros(shape, _DTYPES[spec.dtype])
        except (MemoryError, OverflowError, ValueError, OSError) as exc:
            raise CapacityError(f"cannot allocate the KV cache ({_size(spec.bytes)} for "
                                f"{spec.capacity} tokens: {type(exc).__name__}); free memory, "
                                "or re-export with a smaller --max-context") from None
        self.keys = [self._storage[i, 0] for i in range(spec.num_layers)]
        self.values = [self._storage[i, 1] for i in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return int(self._storage.nbytes)

    @property
    def storage(self) -> np.ndarray:
        return self._storage

    def buffers(self) -> list[np.ndarray]:
        """past_key_0, past_value_0, past_key_1, ... in graph order."""
        return [buf for i in range(self.spec.num_layers) for buf in (self.keys[i], self.values[i])]

    def compact(self, keep: np.ndarray) -> None:
        """Keep the entries at ``keep`` (ascending indices below ``length``), moved to
        ``[0, len(keep))``; the rest are dropped (parallel slots: finished sequences')."""
        keep = np.ascontiguousarray(keep, dtype=np.int64)
        if len(keep) and (keep[0] < 0 or keep[-1] >= self.length or np.any(np.diff(keep) <= 0)):
            raise ValueError(f"compact needs ascending indices below {self.length}")
        if not np.array_equal(keep, np.arange(len(keep))):
            self._storage[:, :, :, :, :len(keep)] = self._storage[:, :, :, :, keep]
        self.length = len(keep)

    def _move(self, offsets: np.ndarray) -> None:
        # [L,2,1,Hkv,n,D] gather of only the accepted entries
        src = self.length + offsets
        dst = np.arange(self.length, self.length + len(offsets))
        self._storage[:, :, :, :, dst] = self._storage[:, :, :, :, src]
