"""``edgert tune``: search each kernel's schedule knobs on the target, record every trial.

For every workload of the model (see ``workloads``), each knob setting not yet in the database
is built for the target, run on the device (this machine, or one reached through a TVM RPC
tracker) with ``time_evaluator``, and appended to the database, which is saved after every
trial: an interrupted run resumes where it stopped. ``trials`` bounds the settings measured
per workload; ``time_budget`` bounds the whole run.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgert.artifact.tvm_build import build_directory
from edgert.errors import BackendError
from edgert.passes.tuning.database import TuningDatabase, TuningRecord
from edgert.passes.tuning.tunable import Workload


@dataclass(frozen=True)
class RPCSpec:
    """A device behind a TVM RPC tracker (``python -m tvm.exec.rpc_tracker``; the device
    runs ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``)."""

    host: str
    port: int
    key: str
    session_timeout: int = 600

    @classmethod
    def parse(cls, tracker: str, key: str) -> RPCSpec:
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise BackendError(f"--rpc-tracker must be HOST:PORT, got '{tracker}'")
        return cls(host, int(port), key)


@dataclass
class TuneOptions:
    trials: int = 16  # knob settings measured per workload (the untuned default included)
    time_budget: float | None = None  # seconds for the whole run
    kernels: list[str] | None = None  # None: every tunable kernel
    rpc: RPCSpec | None = None
    number: int = 3  # timed runs = number x repeat, each after a cache flush
    repeat: int = 5  # the median of the runs is recorded
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))


class _Device:
    dev = None

    def tensor(self, array):
        """A NumPy input as a tensor on the device; scalars pass through."""
        import tvm

        return tvm.runtime.tensor(array, device=self.dev) if isinstance(array, np.ndarray) \
            else array


class LocalDevice(_Device):
    """Builds and times kernels on this machine."""

    name = "local"

    def __init__(self) -> None:
        import tvm

        self.dev = tvm.cpu()

    def load(self, lib):
        return lib


class RemoteDevice(_Device):
    """Builds here, uploads the library to a device reached through an RPC tracker."""

    def __init__(self, spec: RPCSpec) -> None:
        from tvm import rpc

        try:
            tracker = rpc.connect_tracker(spec.host, spec.port)
            self.session = tracker.request(spec.key, session_timeout=spec.session_timeout)
        except Exception as exc:  # tvm raises TVMError/RuntimeError/OSError here
            raise BackendError(f"cannot reach an RPC device '{spec.key}' through the tracker "
                               f"{spec.host}:{spec.port} ({str(exc).splitlines()[0][:160]}); "
                               "is the tracker running and the device's rpc_server registered "
                               "with that key?") from None
        self.dev = self.session.cpu()
        self.name = f"rpc:{spec.key}@{spec.host}:{spec.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="edgert-rpc-")
        self._count = 0

    def load(self, lib):
        self._count += 1
        name = f"kernel{self._count}.so"
        path = Path(self._tmp.name) / name
        lib.export_library(str(path))
        self.session.upload(str(path))
        return self.session.load_module(name)


# a candidate's output must match the untuned kernel's to this tolerance (relative to the
# output's largest magnitude): schedules change the summation order, not the result
CHECK_RTOL = 1e-4


class WrongOutput(Exception):
    """A candidate schedule computed something else than the untuned kernel."""


def _load(workload: Workload, knobs, target, device):
    import tvm

    return device.load(tvm.tirx.build(tvm.IRModule({"kernel": workload.build(knobs)}), target))


def reference_outputs(workload: Workload, target, device, inputs: list[list]) -> list:
    """The untuned kernel's output (the last argument) per measured shape."""
    lib = _load(workload, workload.space[0], target, device)
    outputs = []
    for args in inputs:
        tensors = [device.tensor(a) for a in workload.prepare(workload.space[0], args)]
        lib["kernel"](*tensors)
        outputs.append(tensors[-1].numpy())
    return outputs


def check_output(got: np.ndarray, want: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    diff = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
    if not np.isfinite(diff) or diff > CHECK_RTOL * scale:
        raise WrongOutput(f"wrong output: max abs difference {diff:.3g} from the untuned "
                          f"kernel's (tolerance {CHECK_RTOL * scale:.3g})")


def measure(workload: Workload, knobs, target, device, inputs: list[list], number: int,
            repeat: int, reference: list | None = None) -> float:
    """Median latency in ms (cold caches) of the kernel built with ``knobs``, summed over
    the shapes. With ``reference`` (``reference_outputs``), the kernel's output is checked
    against it first: WrongOutput when it differs."""
    lib = _load(workload, knobs, target, device)
    total = 0.0
    for i, args in enumerate(inputs):
        prepared = workload.prepare(knobs, args)
        tensors = [device.tensor(a) for a in prepared]
        if reference is not None:
            lib["kernel"](*tensors)
            check_output(tensors[-1].numpy(), reference[i])
        runs = min(number * repeat, workload.max_runs or number * repeat)
        if all(isinstance(a, np.ndarray) for a in prepared):
            # weights are read from DRAM in a real step, not from a warm cache: flush the CPU
            # caches (all but the first argument) before every timed run
            timer = lib.time_evaluator("kernel", device.dev, number=1, repeat=runs,
                                       f_preproc="cache_flush_cpu_non_first_arg")
        else:  # TVM's flush takes tensors only (tree attention has a scalar): warm timing
            timer = lib.time_evaluator("kernel", device.dev, number=1, repeat=runs)
        total += float(np.median(timer(*tensors).results)) * 1e3
    return total


def _order(workload: Workload, seed: int) -> list:
    """The untuned default first, then the rest of the space in a fixed shuffled order."""
    rest = list(workload.space[1:])
    random.Random(f"{seed}:{workload.name}").shuffle(rest)
    return [workload.space[0], *rest]


def tune(workloads: list[Workload], database: TuningDatabase, target,
         options: TuneOptions) -> dict[str, dict]:
    """Measure up to ``options.trials`` settings per workload; returns a per-workload summary
    {name: {"untuned_ms", "best_ms", "knobs", "trials"}}."""
    from tqdm import tqdm

    device = RemoteDevice(options.rpc) if options.rpc else LocalDevice()
    database.target = {"target": str(target), "device": device.name}
    started = time.time()
    rng = np.random.default_rng(options.seed)
    summary = {}
    for workload in workloads:
        todo = [k for k in _order(workload, options.seed)[:options.trials]
                if not database.measured(workload.name, workload.knobs_dict(k))]
        inputs = workload.inputs(rng) if todo else []
        try:  # every candidate's output is checked against the untuned kernel's
            reference = reference_outputs(workload, target, device, inputs) if todo else None
        except Exception as exc:  # the untuned kernel itself fails here: nothing to compare
            options.log(f"{workload.name}: the untuned kernel does not run "
                        f"({str(exc).splitlines()[0][:160]}); skipped")
            continue
        bar = tqdm(total=min(options.trials, len(workload.space)), desc=workload.name,
                   unit="trial", file=sys.stderr, leave=True,
                   initial=min(options.trials, len(workload.space)) - len(todo))
        for knobs in todo:
            if options.time_budget is not None and time.time() - started > options.time_budget:
                bar.close()
                options.log(f"time budget of {options.time_budget:.0f} s spent; run again "
                            "to resume")
                database.save()
                return _summary(workloads, database, summary)
            try:
                latency, error = measure(workload, knobs, target, device, inputs,
                                         options.number, options.repeat, reference), None
            except WrongOutput as exc:  # discarded: recorded with its error, never the best
                latency, error = float("inf"), str(exc)
                options.log(f"{workload.name} {workload.knobs_dict(knobs)}: {exc}; discarded")
            except Exception as exc:  # a setting that fails to build/run is recorded as such
                latency, error = float("inf"), str(exc).splitlines()[0][:200]
            database.add(TuningRecord(workload.name, workload.kernel, "knobs",
                                      workload.knobs_dict(knobs), latency, workload.shapes,
                                      error))
            database.save()
            best = database.best(workload.name)
            bar.set_postfix_str(f"best {best.latency_ms:.3f} ms" if best else "no valid trial")
            bar.update(1)
        bar.close()
    return _summary(workloads, database, summary)


def _summary(workloads: list[Workload], database: TuningDatabase, summary: dict) -> dict:
    for workload in workloads:
        trials = database.trials(workload.name)
        if not trials:
            continue
        default = workload.knobs_dict(workload.space[0])
        untuned = next((r.latency_ms for r in trials if r.knobs == default), math.inf)
        best = database.best(workload.name)
        summary[workload.name] = {"untuned_ms": untuned if math.isfinite(untuned) else None,
                                  "best_ms": best.latency_ms if best else None,
                                  "knobs": best.knobs if best else None,
                                  "trials": len(trials)}
    return summary


def tune_artifact(path: Path, target: str = "llvm", options: TuneOptions | None = None,
                  device: str | None = None, compile_after: bool = True) -> dict[str, dict]:
    """Tune the artifact's kernels for ``target``, store the database in
    ``path/tvm/<target>/tuning.json``, and (by default) rebuild with it."""
    from edgert.artifact.io import load_manifest
    from edgert.passes.build import compile_artifact
    from edgert.passes.targets import resolve_target
    from edgert.passes.tuning.tunable import TuneScope, workloads_for

    options = options or TuneOptions()
    path = Path(path)
    manifest = load_manifest(path)
    spec, tvm_target = resolve_target(target, device)
    if spec.gpu and options.rpc is None:
        raise BackendError(f"tuning for {target} measures on a {target} device: pass "
                           "--rpc-tracker/--rpc-key of a device that has one")
    database = TuningDatabase.load(build_directory(path, target))
    workloads = workloads_for(TuneScope.from_manifest(manifest, path), options.kernels)
    summary = tune(workloads, database, tvm_target, options)
    for name, row in summary.items():
        if row["best_ms"] is None or row["untuned_ms"] is None:
            options.log(f"{name:32s} no valid measurement (see the errors in {database.path})")
            continue
        options.log(f"{name:32s} untuned {row['untuned_ms']:9.3f} ms  tuned {row['best_ms']:9.3f}"
                    f" ms  x{row['untuned_ms'] / row['best_ms']:5.2f}  {row['knobs']}")
    if compile_after:
        compile_artifact(path, target, device, log=options.log)
    return summary

