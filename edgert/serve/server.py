"""Run the server: check the options, start the engine's background load, run uvicorn."""

from __future__ import annotations

from pathlib import Path

from edgert.errors import ArtifactError, ConfigError
from edgert.serve.app import ServeOptions, Service, build_app


def make_service(artifact: Path, parallel: int = 1, api_key: str | None = None,
                 max_queue: int = 16, backend: str = "ort", threads: int = 0,
                 prefix_reuse: bool = True) -> Service:
    """The Service for an artifact (its engine loads in the background: /health answers 503
    until it is ready)."""
    from edgert.runtime.engine import load

    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel must be a positive integer, got {parallel!r}")
    if max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {max_queue}")
    artifact = Path(artifact)
    if not (artifact / "edgert.json").is_file():
        raise ArtifactError(f"{artifact} is not an edgert artifact (no edgert.json); export "
                            "one with `edgert export`")
    options = ServeOptions(model=artifact.name, api_key=api_key, max_queue=max_queue,
                           parallel=parallel, prefix_reuse=prefix_reuse)
    return Service(lambda: load(artifact, backend=backend, threads=threads,
                                prefix_reuse=prefix_reuse), options)


def serve_artifact(artifact: Path, host: str, port: int, **kwargs) -> None:
    import uvicorn

    service = make_service(artifact, **kwargs)
    uvicorn.run(build_app(service), host=host, port=port, log_level="warning")
