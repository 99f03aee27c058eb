"""edgert's compiler passes (ONNX -> TVM Relax) and the kernels they lower attention into."""
