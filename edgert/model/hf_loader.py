"""Hugging Face model directory (config.json + safetensors + tokenizer files) -> LoadedModel."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgert.errors import ModelSourceError
from edgert.model.architectures import get_architecture
from edgert.model.loaded import LoadedModel, TokenizerBundle


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"cannot read {path} ({exc}); is it a model directory?") from None


def _architecture_name(data: dict) -> str:
    names = [data.get("model_type", "")] + list(data.get("architectures") or [])
    for name in names:
        try:
            get_architecture(name)
            return name
        except ModelSourceError:
            continue
    return names[0] or "unknown"


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


def _tokenizer_from_dir(directory: Path) -> TokenizerBundle:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelSourceError(
            f"{directory} has no tokenizer.json; edgert needs the fast-tokenizer file "
            "(save it with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
    tok_config = {}
    if (directory / "tokenizer_config.json").is_file():
        tok_config = _read_json(directory / "tokenizer_config.json")
    template = tok_config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TokenizerBundle(
        tokenizer_json=tokenizer_file.read_text(),
        chat_template=template,
        bos_token=_token_text(tok_config.get("bos_token")),
        eos_token=_token_text(tok_config.get("eos_token")),
        add_bos_token=bool(tok_config.get("add_bos_token", False)),
    )


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(
            f"{directory} has no *.safetensors weights; convert .bin checkpoints with "
            "transformers' save_pretrained(safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelSourceError(f"cannot read weights {file} ({exc}); the file is corrupt "
                                   "or truncated") from None
    return {name: t.to(torch.float32) for name, t in state.items()}


def load_hf_dir(directory: Path) -> LoadedModel:
    """Read a transformers-style model directory; weights converted to fp32."""
    data = _read_json(directory / "config.json")
    arch_name = _architecture_name(data)
    arch = get_architecture(arch_name)
    config = arch.config_from_hf(data)
    return LoadedModel(
        architecture=arch.name,
        config=config,
        state_dict=_load_weights(directory),
        tokenizer=_tokenizer_from_dir(directory),
        source={"kind": "hf_dir", "path": str(directory)},
    )
