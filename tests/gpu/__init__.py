"""edgert on an NVIDIA GPU (marker ``gpu``; scripts/gpu_check.sh runs it on a GPU machine).

test_kernels.py: edgert's TIR kernels built for the GPU against their NumPy references;
test_backends.py: ``edgert compile --target cuda``, then greedy, Medusa and DHSA decoding
through the TVM cuda build and ONNX Runtime's CUDA EP against ONNX Runtime on the CPU.
conftest.py: the device, the artifact and the JSON record (see its docstring for the settings).
"""
