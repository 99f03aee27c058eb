"""The GPU tests' device, artifact and JSON record.

Every test here carries the ``gpu`` marker and runs only when selected (``-m gpu``, or a
device named below); otherwise, or with no CUDA device, the whole directory skips with one
reason. Settings (an option, where pytest is pointed at tests/gpu, else its environment variable):

  --gpu-device cuda|llvm   EDGERT_GPU_CHECK_DEVICE  cuda (default): GPU 0; llvm: the CPU dry run
                           (the kernel tests built for llvm on this CPU; the backend tests skip)
  --gpu-artifact PATH      EDGERT_GPU_ARTIFACT      default artifacts/smollm2-135m (repo root)
  --gpu-record PATH        EDGERT_GPU_RECORD        write the session's JSON record there
  --gpu-prompts N          EDGERT_GPU_PROMPTS       bench prompts per decoding mode (3)
  --gpu-new-tokens N       EDGERT_GPU_NEW_TOKENS    tokens generated per prompt (64)
  --gpu-no-compile         EDGERT_GPU_NO_COMPILE=1  reuse the artifact's cuda build
  --gpu-strict                                      no GPU or artifact stops the session (exit
                                                    status 2 or 1) rather than skipping
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gpu.checks import ROOT, Device, Recorder

HERE = Path(__file__).resolve().parent
DEFAULT_ARTIFACT = Path("artifacts") / "smollm2-135m"
DEVICES = ("cuda", "llvm")
MARKER = ("gpu: edgert on an NVIDIA GPU (tests/gpu, scripts/gpu_check.sh); select with -m gpu, "
          "a CPU dry run with EDGERT_GPU_CHECK_DEVICE=llvm")
RECORDER = pytest.StashKey[Recorder]()
SETTINGS = pytest.StashKey["Settings"]()
PLUGIN = "edgert-gpu-record"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("gpu", "edgert's GPU checks (tests/gpu)")
    group.addoption("--gpu-device", choices=DEVICES, default=None,
                    help="cuda (GPU 0, the default) or llvm (the kernel tests on this CPU)")
    group.addoption("--gpu-artifact", default=None, help=f"default {DEFAULT_ARTIFACT}")
    group.addoption("--gpu-record", default=None, help="write the JSON record to this file")
    group.addoption("--gpu-prompts", type=int, default=None, help="bench prompts per mode (3)")
    group.addoption("--gpu-new-tokens", type=int, default=None, help="tokens per prompt (64)")
    group.addoption("--gpu-no-compile", action="store_true", default=False,
                    help="use the cuda build already in the artifact")
    group.addoption("--gpu-strict", action="store_true", default=False,
                    help="stop (exit status 2: no GPU, 1: no artifact) instead of skipping")


def pytest_configure(config) -> None:
    if not any(line.split(":")[0].strip() == "gpu" for line in config.getini("markers")):
        config.addinivalue_line("markers", MARKER)  # until pyproject.toml lists it
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.register(RecordPlugin(config), PLUGIN)


@dataclass(frozen=True)
class Settings:
    device: str
    selected: bool  # -m selects gpu, or a device was named
    artifact: Path
    record: Path | None
    prompts: int
    new_tokens: int
    no_compile: bool
    strict: bool


def _marker_selected(expression: str) -> bool:
    """Whether ``-m`` names ``gpu`` other than as ``not gpu``."""
    words = re.findall(r"[\w.]+", expression or "")
    return any(w == "gpu" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


def gpu_settings_of(config) -> Settings:
    if SETTINGS in config.stash:
        return config.stash[SETTINGS]

    def setting(option: str, env: str):
        value = config.getoption(option, default=None)
        return value if value not in (None, False) else os.environ.get(env) or None

    device = setting("gpu_device", "EDGERT_GPU_CHECK_DEVICE")
    artifact = Path(setting("gpu_artifact", "EDGERT_GPU_ARTIFACT") or ROOT / DEFAULT_ARTIFACT)
    record = setting("gpu_record", "EDGERT_GPU_RECORD")
    no_compile = setting("gpu_no_compile", "EDGERT_GPU_NO_COMPILE")
    settings = Settings(
        device=device or "cuda",
        selected=device is not None or _marker_selected(config.getoption("markexpr", "")),
        artifact=artifact, record=Path(record) if record else None,
        prompts=int(setting("gpu_prompts", "EDGERT_GPU_PROMPTS") or 3),
        new_tokens=int(setting("gpu_new_tokens", "EDGERT_GPU_NEW_TOKENS") or 64),
        no_compile=no_compile not in (None, "0", "false"),
        strict=bool(config.getoption("gpu_strict", default=False)))
    config.stash[SETTINGS] = settings
    return settings


def recorder_of(config) -> Recorder:
    if RECORDER not in config.stash:
        config.stash[RECORDER] = Recorder()
    return config.stash[RECORDER]


def unavailable(config, reason: str, code: int):
    """The whole session cannot run: skip (one reason, cached by the session fixture), or
    with --gpu-strict stop with ``code`` (2: no GPU, 1: no artifact; scripts/gpu_check.sh)."""
    recorder_of(config).unavailable = reason
    if gpu_settings_of(config).strict:
        pytest.exit(f"gpu_check: {reason}", returncode=code)
    pytest.skip(reason)


def _cuda_compiler() -> str | None:
    """How the kernel tests compile CUDA, through TVM's callback: NVRTC (cuda-python), else
    nvcc when cuda-python is missing."""
    try:
        import cuda.bindings  # noqa: F401

        return "nvrtc"
    except ImportError:
        if shutil.which("nvcc"):
            os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
            return "nvcc"
    return None


def _cuda_device(config) -> Device:
    import tvm

    from edgert.errors import BackendError
    from edgert.runtime.backends.tvm_vm import check_cuda_device

    try:
        check_cuda_device()
    except BackendError as exc:
        unavailable(config, f"{exc} (a CPU dry run of the kernel tests: "
                            "EDGERT_GPU_CHECK_DEVICE=llvm)", 2)
    compiler = _cuda_compiler()
    if compiler is None:
        unavailable(config, "no CUDA compiler for the kernel tests: install cuda-python "
                            "(NVRTC) or the CUDA toolkit (nvcc)", 2)
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "")
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    recorder_of(config).data["kernel_compiler"] = compiler
    return Device("cuda", dev, target, {"name": dev.device_name, "arch": arch})


@pytest.fixture(scope="session")
def gpu_settings(request) -> Settings:
    return gpu_settings_of(request.config)


@pytest.fixture(scope="session")
def gpu_record(request) -> Recorder:
    return recorder_of(request.config)


@pytest.fixture(scope="session", autouse=True)
def gpu_device(request, gpu_settings, gpu_record) -> Device:
    """The device of every test here; skips the session when not selected or not there."""
    if not gpu_settings.selected:
        gpu_record.skip_reason = "not selected (run them with -m gpu)"
        pytest.skip("GPU checks not selected: run them with -m gpu (scripts/gpu_check.sh on a "
                    "GPU machine), or EDGERT_GPU_CHECK_DEVICE=llvm -m gpu for a CPU dry run")
    if gpu_settings.device not in DEVICES:
        pytest.exit(f"EDGERT_GPU_CHECK_DEVICE={gpu_settings.device}: choose one of "
                    f"{', '.join(DEVICES)}", returncode=pytest.ExitCode.USAGE_ERROR)
    if gpu_settings.device == "llvm":
        import tvm

        from edgert.passes.targets import resolve_target

        _, target = resolve_target("llvm")
        device = Device("llvm", tvm.cpu(0), target, {"name": "cpu"})
        gpu_record.data["dry_run"] = "llvm on the CPU"
    else:
        device = _cuda_device(request.config)
        gpu_record.data["gpu"] = device.info
    gpu_record.data["device"] = device.name
    return device


@pytest.fixture(scope="session")
def artifact(request, gpu_settings, gpu_record) -> Path:
    path = gpu_settings.artifact
    gpu_record.data["artifact"] = str(path)
    if not (path / "edgert.json").is_file():
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        unavailable(request.config,
                    f"no edgert artifact at {shown}; export it with `edgert export smollm2-135m "
                    f"-o {shown}` (scripts/gpu_check.sh does), or point EDGERT_GPU_ARTIFACT at "
                    "one", 1)
    return path


@pytest.fixture(scope="session")
def manifest(artifact):
    from edgert.artifact.io import load_manifest

    return load_manifest(artifact, verify=False)


# -- the record -------------------------------------------------------------------------------
class RecordPlugin:
    """Counts the outcomes of the tests here; at the session's end writes the record
    (``--gpu-record``) and prints it, or the one reason the directory skipped."""

    def __init__(self, config) -> None:
        self.config = config
        self.record: dict | None = None

    def _is_gpu_test(self, nodeid: str) -> bool:
        path = self.config.rootpath / nodeid.split("::", 1)[0]
        return path.resolve().is_relative_to(HERE)

    def pytest_runtest_logreport(self, report) -> None:
        if not self._is_gpu_test(report.nodeid):
            return
        recorder = recorder_of(self.config)
        if report.nodeid.split("::", 1)[0].endswith("test_kernels.py"):
            recorder.kernel_seconds += report.duration
        if report.when == "call":
            outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        elif report.failed:
            outcome = "error"
        elif report.when == "setup" and report.skipped:
            outcome = "skipped"
        else:
            return
        recorder.outcomes[outcome] += 1
        if outcome in ("failed", "error"):
            recorder.failed.append(report.nodeid)

    def pytest_sessionfinish(self, session) -> None:
        settings = gpu_settings_of(self.config)
        if RECORDER not in self.config.stash and settings.record is None:
            return  # no test here ran or skipped (deselected)
        self.record = recorder_of(self.config).final()
        if settings.record is not None:
            settings.record.parent.mkdir(parents=True, exist_ok=True)
            settings.record.write_text(json.dumps(self.record) + "\n")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.record is None:
            return
        recorder, settings = recorder_of(self.config), gpu_settings_of(self.config)
        if recorder.seen and not recorder.ran:
            reason = recorder.unavailable or recorder.skip_reason or "see -rs"
            terminalreporter.write_line(f"tests/gpu: {recorder.seen} skipped: {reason}")
        if recorder.ran or settings.record is not None:
            terminalreporter.write_line(json.dumps(self.record))
        if settings.record is not None:
            terminalreporter.write_line(f"gpu record: {settings.record}")
