"""``edgert`` command line: a thin layer over the library (each command calls one function)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from edgert.errors import EdgertError


def friendly_errors(func):
    """Turn EdgertError (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgertError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="edgert")
def main() -> None:
    """edgert: export, compile and run LLMs with Medusa decoding on edge devices."""


@main.command()
@click.argument("model", default="smollm2-135m")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Artifact directory to write (created atomically).")
@click.option("--max-context", type=int, default=None,
              help="KV-cache capacity in tokens. Default: the model's maximum, lowered to fit "
                   "memory (a note says so).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@friendly_errors
def export(model: str, output: Path, max_context: int | None, force: bool) -> None:
    """Export MODEL (a registered name, a Hugging Face directory or a .gguf file) to an
    ONNX artifact. Default MODEL: smollm2-135m."""
    from edgert.export.exporter import ExportOptions, export_model

    export_model(model, output, ExportOptions(max_context=max_context, overwrite=force))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The user message (or raw text with --raw).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True,
              help="Stop after this many new tokens (or at EOS).")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 = greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Nucleus sampling threshold (1 = off).")
@click.option("--top-k", type=int, default=0, show_default=True, help="Top-k filter (0 = off).")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--raw", is_flag=True, help="Send the prompt as plain text, without the chat "
                                         "template.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (prompt_ids, output_ids, text, stats) instead of "
                   "streaming text.")
@click.option("--backend", default="ort", show_default=True, help="Inference backend.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Intra-op threads (0 = the runtime's default).")
@friendly_errors
def run(artifact: Path, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
        top_k: int, seed: int | None, raw: bool, as_json: bool, backend: str, device: str,
        threads: int) -> None:
    """Generate text from ARTIFACT for one prompt."""
    from edgert.runtime.engine import load

    engine = load(artifact, backend=backend, device=device, threads=threads)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, seed=seed, chat=not raw)
    if as_json:
        click.echo(json.dumps(engine.generate(prompt, **kwargs).to_dict()))
        return
    stats: dict = {}
    for piece in engine.stream(prompt, stats=stats, **kwargs):
        click.echo(piece, nl=False)
    click.echo()
    click.echo(f"[{stats['new_tokens']} tokens, prefill {stats['prefill_ms']:.0f} ms, "
               f"decode {stats['decode_tokens_per_s']:.1f} tok/s]", err=True)


if __name__ == "__main__":
    main()
