"""The engine's sequence slot: one KV cache, so one generation at a time.

Generations on one Engine from several threads take turns: each holds the slot for its whole
prefill and decode loop (a ``stream()`` generator until it ends or is closed). A second
generation started by the thread that already holds the slot (an unfinished ``stream()``
generator and a new request interleaved) would decode over the first one's cache; it is
refused with a clear error instead of deadlocking or returning wrong text.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from edgert.errors import GenerationError


class SlotBusy(GenerationError):
    """The slot is taken and the caller asked not to wait."""


class SequenceSlot:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @contextmanager
    def hold(self, wait: bool = True) -> Iterator[None]:
        """Hold the slot for a generation (waiting for it unless ``wait`` is False)."""
        me = threading.get_ident()
        if self._owner == me:
            raise GenerationError("this thread is already generating on this engine (an "
                                  "unfinished stream()); finish or close that generator "
                                  "before starting another")
        if not self._lock.acquire(blocking=wait):
            raise SlotBusy("the engine is generating for another caller; retry later")
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()
