"""What the GPU tests share: tolerances, cases, the device, kernel builds and the record."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4  # float32 kernels vs NumPy (sums in another order; GPU exp/div)
TREES = {
    "decode": [-1],
    "chain4": [-1, 0, 1, 2],
    "medusa": [-1, 0, 0, 1, 2, 3],
    "wide": [-1, 0, 0, 0, 1, 1, 2, 4],
    "deep16": [-1, *range(15)],
}
PREFIXES = [0, 1, 37, 700]
KV_APPEND_CASES = [(0, 1), (0, 300), (37, 1), (511, 6), (700, 324)]  # (past, new entries)
KV_COMMIT_PATHS = [[0], [0, 1, 2], [0, 2, 5], [0, 3, 4, 7], [1, 2, 6, 7], [0, 1, 3]]


@dataclass(frozen=True)
class Device:
    """Where the kernels are built and run: "cuda" (GPU 0) or "llvm" (the CPU dry run)."""

    name: str
    dev: Any  # tvm.runtime.Device
    target: Any  # tvm.target.Target
    info: dict

    @property
    def gpu(self) -> bool:
        return self.name != "llvm"


class KernelBuilder:
    """Builds each kernel once per session (the tests of one kernel share a build)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._built: dict[tuple, Any] = {}

    def build(self, name: str, key: tuple, make_func):
        """``name`` built from ``make_func()`` (a PrimFunc), cached under ``(name, *key)``."""
        import tvm

        cache_key = (name, *key)
        if cache_key not in self._built:
            module = tvm.tirx.build(tvm.IRModule({name: make_func()}), self.device.target)
            self._built[cache_key] = module[name]
        return self._built[cache_key]

    def tensor(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array), device=self.device.dev)


@dataclass
class Recorder:
    """The session's measurements, written as one JSON record at its end (conftest.py)."""

    data: dict = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    unavailable: str | None = None  # why the whole session could not run (no GPU, artifact)
    skip_reason: str | None = None  # why it did not run otherwise (not selected)
    kernel_seconds: float = 0.0
    started: float = field(default_factory=time.time)

    @property
    def seen(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ran(self) -> int:
        return sum(self.outcomes[k] for k in ("passed", "failed", "error", "xfailed"))

    def kernel_error(self, kernel: str, case: str, error: float, tolerance: float) -> None:
        """One case's max |kernel - reference|: the record keeps the worst and the failures."""
        row = self.data.setdefault("kernels", {}).setdefault(
            kernel, {"max_error": 0.0, "worst_case": None, "cases": 0, "ok": True})
        if error >= row["max_error"]:
            row["max_error"], row["worst_case"] = error, case
        row["cases"] += 1
        if not error <= tolerance:  # NaN fails too
            row["ok"] = False
            row.setdefault("failed_cases", []).append(case)

    def kernel_mismatches(self, kernel: str, case: str, mismatches: int) -> None:
        row = self.data.setdefault("kernels", {}).setdefault(
            kernel, {"mismatched_starts": 0, "cases": 0, "ok": True})
        row["mismatched_starts"] += mismatches
        row["cases"] += 1
        if mismatches:
            row["ok"] = False
            row.setdefault("failed_cases", []).append(case)

    def backend(self, name: str) -> dict:
        return self.data.setdefault("backends", {}).setdefault(name, {})

    def final(self) -> dict:
        """The record: ``ok`` when tests ran and none failed (kernels within tolerance, the TVM
        cuda backend loaded and decoded); identical counts and speeds are reported only."""
        kernels = self.data.get("kernels", {})
        if kernels:
            kernels["seconds"] = round(self.kernel_seconds, 1)
        kernels_ok = all(row.get("ok", True) for row in kernels.values()
                         if isinstance(row, dict))
        ok = (self.unavailable is None and self.ran > 0 and kernels_ok
              and not self.outcomes["failed"] and not self.outcomes["error"])
        record = {"check": "gpu", "ok": ok, **self.data}
        if self.unavailable is not None:
            record["unavailable"] = self.unavailable
        record["tests"] = dict(sorted(self.outcomes.items()))
        if self.failed:
            record["failed"] = self.failed
        record["seconds"] = round(time.time() - self.started, 1)
        return record
