"""edgert's compiler passes (ONNX -> TVM Relax) and the kernels they lower attention into."""

import tvm_ffi

from edgert import errors

# a pass runs under TVM's FFI, which turns an unregistered Python exception into RuntimeError;
# registered, edgert's errors reach the caller with their own type (and the CLI's message)
for _error in (errors.EdgertError, errors.ConfigError, errors.ArtifactError,
               errors.BackendError):
    tvm_ffi.register_error(_error)
