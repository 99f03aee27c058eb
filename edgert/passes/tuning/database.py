"""The tuning database of one target: every trial measured, and the best schedule per workload.

Stored as ``artifact/tvm/<target>/tuning.json``::

    {"version": 1, "target": {...},
     "records": [{"workload": "matmul_576_49152", "kernel": "matmul", "searcher": "knobs",
                  "knobs": {"bn": 32, "mb": 2}, "latency_ms": 9.1, "shapes": "...",
                  "error": null}, ...]}

A workload names a kernel instance (kernel + the static shapes it was built for); knobs are
the kernel's schedule parameters. ``edgert tune`` appends records (and skips configurations
already measured, so tuning resumes); ``edgert compile`` asks ``best(workload)``. MetaSchedule's
own JSON database for the kernels it tunes sits next to it in ``metaschedule/``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgert.artifact.tvm_build import TUNING_DATABASE
from edgert.errors import ArtifactError

FILE = TUNING_DATABASE
VERSION = 1


@dataclass
class TuningRecord:
    workload: str
    kernel: str
    searcher: str  # "knobs" (edgert's own search) or "metaschedule"
    knobs: dict[str, Any]
    latency_ms: float  # median over the measurement's repeats; inf when the trial failed
    shapes: str = ""
    error: str | None = None


@dataclass
class TuningDatabase:
    path: Path | None = None
    target: dict[str, Any] = field(default_factory=dict)
    records: list[TuningRecord] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> TuningDatabase:
        path = Path(directory) / FILE
        if not path.is_file():
            return cls(path=path)
        try:
            data = json.loads(path.read_text())
            records = [_record(r) for r in data["records"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path} is not a tuning database ({exc}); delete it and tune "
                                "again") from None
        if data.get("version") != VERSION:
            raise ArtifactError(f"{path} has version {data.get('version')}, this edgert reads "
                                f"{VERSION}; delete it and tune again")
        return cls(path=path, target=data.get("target", {}), records=records)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = {"version": VERSION, "target": self.target,
                "records": [_jsonable(asdict(r)) for r in self.records]}
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def add(self, record: TuningRecord) -> None:
        self.records.append(record)

    def measured(self, workload: str, knobs: dict[str, Any]) -> bool:
        return any(r.workload == workload and r.knobs == knobs for r in self.records)

    def trials(self, workload: str) -> list[TuningRecord]:
        return [r for r in self.records if r.workload == workload]

    def best(self, workload: str) -> TuningRecord | None:
        ok = [r for r in self.trials(workload) if r.error is None and math.isfinite(r.latency_ms)]
        return min(ok, key=lambda r: r.latency_ms) if ok else None

    def workloads(self) -> list[str]:
        return sorted({r.workload for r in self.records})


def _jsonable(record: dict) -> dict:
    if not math.isfinite(record["latency_ms"]):
        record["latency_ms"] = None
    return record


def _record(data: dict) -> TuningRecord:
    latency = data.get("latency_ms")
    return TuningRecord(**{**data, "latency_ms": math.inf if latency is None else latency})
