"""A trained module on disk: ``<name>.safetensors`` (its state) + ``<name>.json`` (its config).

Shared by the Medusa heads (``edgert.model.medusa_heads``) and the draft layer
(``edgert.export.draft_layer``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn


def save_module_files(module: nn.Module, config: dict[str, Any], directory: Path,
                      weights_file: str, config_file: str) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / weights_file))
    (directory / config_file).write_text(json.dumps(config, indent=2) + "\n")
