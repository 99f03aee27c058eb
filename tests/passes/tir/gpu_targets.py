"""The GPU targets the TIR kernel tests build for (sources only: no GPU runtime here)."""

GPU_TARGETS = {
    "cuda": {"kind": "cuda", "arch": "sm_80"},
    "opencl": {"kind": "opencl", "device": "adreno"},
    "metal": {"kind": "metal"},
    "webgpu": {"kind": "webgpu"},
}
