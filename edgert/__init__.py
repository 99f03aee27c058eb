"""edgert: edge LLM inference runtime (ONNX artifacts, Medusa decoding, TVM kernels)."""

from edgert.__about__ import __version__
from edgert.errors import (
    ArtifactError,
    BackendError,
    CapacityError,
    ConfigError,
    EdgertError,
    GenerationError,
    ModelSourceError,
)
from edgert.runtime.engine import Engine, Result, load

__all__ = [
    "ArtifactError", "BackendError", "CapacityError", "ConfigError", "EdgertError", "Engine",
    "GenerationError", "ModelSourceError", "Result", "__version__", "load",
]
