"""One exception hierarchy for everything edgert reports to a user.

Every message names the problem and the fix, on one line. The CLI prints
``error: <message>`` and exits non-zero; API callers catch :class:`EdgertError`.
"""

from __future__ import annotations


class EdgertError(Exception):
    """Base class of every error edgert raises on purpose."""


class ModelSourceError(EdgertError):
    """The model to export cannot be found, read or is of an unsupported architecture."""


class ConfigError(EdgertError, ValueError):
    """A configuration (model config, manifest field, option) is invalid."""


class ArtifactError(EdgertError):
    """An artifact is missing, corrupt, truncated, tampered with or of another format version."""


class CapacityError(EdgertError):
    """A request does not fit in the KV cache capacity the artifact was exported with."""


class GenerationError(EdgertError, ValueError):
    """A generation request is invalid (empty prompt, bad sampling values, ...)."""


class BackendError(EdgertError):
    """A backend or device is not available on this machine."""


def last_line(exc: BaseException, limit: int = 240) -> str:
    """The last non-blank line of an exception's message (TVM's and ONNX Runtime's carry
    long stack traces before it), for a one-line error; the type name when it has none."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:limit]
