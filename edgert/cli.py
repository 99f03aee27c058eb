"""``edgert`` command line: a thin layer over the library (each command calls one function)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from edgert.errors import ArtifactError, EdgertError

# packages of the extras -> the extra that installs them (`pip install edgert` runs artifacts)
EXTRA_OF = {"torch": "export", "onnx": "export", "gguf": "export", "safetensors": "export",
            "tvm": "tvm", "tvm_ffi": "tvm", "starlette": "serve", "uvicorn": "serve"}


def friendly_errors(func):
    """Turn EdgertError (and Ctrl-C) into one line on stderr and a non-zero exit; a missing
    package of an extra into the install command that brings it."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ModuleNotFoundError as exc:
            extra = EXTRA_OF.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            click.echo(f"error: this command needs {exc.name}, which `pip install edgert` does "
                       f"not bring; install the extra: pip install 'edgert[{extra}]'", err=True)
            sys.exit(1)
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
@click.option("--heads", type=click.Path(path_type=Path), default=None,
              help="Medusa heads directory (heads.json + heads.safetensors). Default: the "
                   "registered model's committed heads, if any.")
@click.option("--no-heads", is_flag=True, help="Export without Medusa heads.")
@click.option("--medusa-topk", type=int, default=10, show_default=True,
              help="How many candidates per head the heads graph returns.")
@click.option("--tree", default=None,
              help="Medusa tree: a JSON file of top-k rank paths, or a shipped name (chain, cpu, "
                   "gpu). Default: the registered model's tuned tree, else 'cpu'.")
@click.option("--dhsa", "dhsa_settings", multiple=True, metavar="KEY=VALUE",
              help="A DHSA prefill parameter (repeatable), e.g. --dhsa budget=2048 --dhsa "
                   "prefill_chunk=2048; docs/dhsa.md lists them and their defaults.")
@click.option("--no-dhsa", is_flag=True, help="Export without the DHSA prefill graph.")
@click.option("--weights", type=click.Choice(["auto", "q4", "q8", "fp32"]), default="auto",
              show_default=True,
              help="Weight storage. auto: the source's own precision (a GGUF's Q4_0/Q4_1/Q8_0 "
                   "blocks as stored, other GGUF types requantized to 4/8 bits, HF float "
                   "weights fp32); q4/q8: 4/8-bit blocks of 32 (round to nearest, 4 bits with "
                   "integer zero points: fastest, but a GGUF's Q4_1 is requantized; the "
                   "embedding 8-bit at q4); fp32: everything dequantized.")
@click.option("--compute", type=click.Choice(["int8", "fp32"]), default="int8",
              show_default=True,
              help="Quantized matmuls: int8 quantizes activations per block (fastest); fp32 "
                   "dequantizes in the kernel (output = the dequantized model up to summation "
                   "order; 8-bit weights are expanded to fp32 at load).")
@click.option("--draft", type=click.Path(path_type=Path), default=None,
              help="EAGLE-style draft layer directory (edgert train-draft). Default: the "
                   "registered model's committed draft, if any.")
@click.option("--no-draft", is_flag=True, help="Export without a draft layer.")
@click.option("--draft-depth", type=int, default=1, show_default=True,
              help="Tokens the draft layer drafts per step (its chain at int8 activations, "
                   "its tree's depth otherwise). 1 measured fastest on a 2-core CPU for "
                   "SmolLM2's draft (bench/results/speculative_draft_q4.json).")
@click.option("--draft-topk", type=int, default=4, show_default=True,
              help="Candidates per row the draft graph returns.")
@click.option("--draft-weights", type=click.Choice(["q8", "fp32"]), default="q8",
              show_default=True,
              help="The draft layer's own matrices: q8 (8-bit, int8 compute, in every "
                   "artifact: its tokens are verified, so precision changes speed only) or "
                   "fp32.")
@click.option("--no-draft-tree", is_flag=True,
              help="Ignore the draft directory's tuned trees (its tree.json, written from "
                   "`edgert tune-tree --drafter draft --save`): draft --draft-depth tokens.")
@friendly_errors
def export(model: str, output: Path, max_context: int | None, force: bool, heads: Path | None,
           no_heads: bool, medusa_topk: int, tree: str | None, dhsa_settings: tuple[str, ...],
           no_dhsa: bool, weights: str, compute: str, draft: Path | None, no_draft: bool,
           draft_depth: int, draft_topk: int, draft_weights: str, no_draft_tree: bool) -> None:
    """Export MODEL (a registered name, a Hugging Face directory or a .gguf file) to an
    ONNX artifact. Default MODEL: smollm2-135m."""
    from edgert.dhsa.params import DHSAParams
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.export.quantize import WeightOptions

    dhsa = None if no_dhsa else DHSAParams.from_settings(dhsa_settings)
    export_model(model, output, ExportOptions(max_context=max_context, overwrite=force,
                                              heads=heads, use_heads=not no_heads,
                                              medusa_topk=medusa_topk, tree=tree, dhsa=dhsa,
                                              weights=WeightOptions(weights, compute),
                                              draft=draft, use_draft=not no_draft,
                                              draft_depth=draft_depth, draft_topk=draft_topk,
                                              draft_weights=draft_weights,
                                              use_draft_tree=not no_draft_tree))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@friendly_errors
def verify(artifact: Path) -> None:
    """Check every byte of ARTIFACT's files against the SHA-256 recorded at export (a load
    checks sizes and sampled digests only)."""
    from edgert.artifact.io import load_manifest

    manifest = load_manifest(artifact, verify="full")
    click.echo(f"ok: {len(manifest.files)} files of {artifact} match their SHA-256")


@main.command("compile")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", default="llvm", show_default=True,
              help="llvm, cuda, opencl, metal or webgpu (vulkan is refused with the reason).")
@click.option("--device", default=None, help="Target device refinement, e.g. adreno (opencl).")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None,
              help="Write the IR after each pipeline phase into this directory.")
@friendly_errors
def compile_cmd(artifact: Path, target: str, device: str | None, dump_ir: Path | None) -> None:
    """Compile ARTIFACT with TVM and edgert's passes into ARTIFACT/tvm/TARGET/."""
    from edgert.passes.build import compile_artifact

    record = compile_artifact(artifact, target, device, dump_ir)
    click.echo(f"{target}: {', '.join(record['files'])} ({record['seconds']} s)")


@main.command("tune")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", default="llvm", show_default=True, help="The target to tune for.")
@click.option("--device", default=None, help="Target device refinement, e.g. adreno (opencl).")
@click.option("--trials", type=int, default=16, show_default=True,
              help="Schedules measured per kernel (the untuned one included).")
@click.option("--time-budget", type=float, default=None,
              help="Seconds for the whole run; an unfinished run resumes next time.")
@click.option("--kernel", "kernels", multiple=True,
              help="Tune only these kernels (tree_attention, matmul, ...); default all.")
@click.option("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker.")
@click.option("--rpc-key", default=None, help="Device key registered with the tracker.")
@click.option("--no-compile", is_flag=True, help="Only tune; do not rebuild the module.")
@friendly_errors
def tune_cmd(artifact: Path, target: str, device: str | None, trials: int,
             time_budget: float | None, kernels: tuple[str, ...], rpc_tracker: str | None,
             rpc_key: str | None, no_compile: bool) -> None:
    """Tune ARTIFACT's kernels for TARGET; the database goes to ARTIFACT/tvm/TARGET/."""
    from edgert.passes.tuning.tuner import RPCSpec, TuneOptions, tune_artifact

    if (rpc_tracker is None) != (rpc_key is None):
        raise EdgertError("--rpc-tracker and --rpc-key go together")
    rpc = RPCSpec.parse(rpc_tracker, rpc_key) if rpc_tracker else None
    options = TuneOptions(trials=trials, time_budget=time_budget,
                          kernels=list(kernels) or None, rpc=rpc)
    summary = tune_artifact(artifact, target, options, device, compile_after=not no_compile)
    click.echo(json.dumps({"tuned": summary}))


def self_distillation_options(command):
    """The self-distillation data options train-heads and train-draft share."""
    for option in reversed([
            click.option("--data", "data_file", type=click.Path(path_type=Path, exists=True),
                         default=None,
                         help="JSONL of {prompt, response} or {text}; default: "
                              "self-distillation on the shipped prompt set."),
            click.option("--max-prompts", type=int, default=None,
                         help="Use only the first N shipped prompts (default: all)."),
            click.option("--max-new-tokens", type=int, default=256, show_default=True,
                         help="Length of the backbone's self-distillation responses."),
            click.option("--prompts-per-topic", type=int, default=3, show_default=True,
                         help="Templates per topic in the shipped prompt set (more = more "
                              "data)."),
            click.option("--prompt-set", type=click.Choice(["base", "wide"]), default="base",
                         show_default=True,
                         help="wide: the shipped prompts plus about 180 training-only topics "
                              "(about 3x the data; the held-out prompts stay the same).")]):
        command = option(command)
    return command


@main.command("train-heads")
@click.argument("model", default="smollm2-135m")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Heads directory to write; its cache/ keeps data and checkpoints (resume).")
@click.option("--num-heads", type=int, default=4, show_default=True)
@click.option("--num-layers", type=int, default=1, show_default=True,
              help="Residual blocks per head.")
@click.option("--steps", type=int, default=600, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Positions per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@self_distillation_options
@click.option("--condition", type=click.Choice(["none", "token"]), default="none",
              show_default=True,
              help="token: heads also read the embedding of the token the backbone chose "
                   "(the tree root).")
@click.option("--output-vocab", type=int, default=0, show_default=True,
              help="Heads score only this many of the most frequent target tokens (0 = all): "
                   "a cheaper heads call.")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def train_heads(model: str, output: Path, num_heads: int, num_layers: int, steps: int,
                batch_size: int, lr: float, data_file: Path | None, max_prompts: int | None,
                max_new_tokens: int, prompts_per_topic: int, prompt_set: str, condition: str,
                output_vocab: int, seed: int) -> None:
    """Train Medusa-1 heads for MODEL on its own responses (frozen backbone)."""
    from edgert.train.distill import DistillOptions
    from edgert.train.heads_loop import TrainOptions
    from edgert.train.train_heads import TrainHeadsOptions, train_heads_for_model

    options = TrainHeadsOptions(
        train=TrainOptions(num_heads=num_heads, num_layers=num_layers, steps=steps,
                           batch_size=batch_size, lr=lr, seed=seed, condition=condition,
                           output_vocab=output_vocab),
        distill=DistillOptions(max_new_tokens=max_new_tokens, seed=seed),
        data_file=data_file, max_prompts=max_prompts, prompts_per_topic=prompts_per_topic,
        prompt_set=prompt_set)
    train_heads_for_model(model, output, options)


def _layer_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer counts "
                                 "(e.g. 2,15)") from None


@main.command("train-draft")
@click.argument("model", default="smollm2-135m")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Draft directory to write; its cache/ keeps data and checkpoints (resume).")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps.")
@click.option("--sequences-per-step", type=int, default=8, show_default=True,
              help="Sequences packed into each step's row.")
@click.option("--max-tokens", type=int, default=2048, show_default=True,
              help="Rows per step (the packed sequences are cut there).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@self_distillation_options
@click.option("--output-vocab", type=int, default=8192, show_default=True,
              help="The draft scores only this many of the most frequent tokens (0 = all): "
                   "a cheaper draft step.")
@click.option("--responses-artifact", type=click.Path(path_type=Path, exists=True),
              default=None,
              help="An exported artifact of MODEL that answers the prompts (parallel slots: "
                   "about 4x faster than transformers on a CPU).")
@click.option("--token-target", type=click.Choice(["argmax", "distribution"]),
              default="argmax", show_default=True,
              help="What the token loss teaches: the backbone's argmax, or its whole "
                   "next-token distribution (soft labels).")
@click.option("--token-weight", type=float, default=0.1, show_default=True,
              help="The token loss's weight beside the feature regression's (1.0).")
@click.option("--feature-layers", default="", callback=_layer_list,
              help="Comma-separated layer counts, e.g. 2,15: the residual stream after those "
                   "layers joins the draft's feature (EAGLE-3-style multi-layer features; the "
                   "backbone's graphs return them too). Default: the final hidden state only.")
@click.option("--feature-dropout", type=float, default=0.1, show_default=True,
              help="Share of rows trained without those residual states (as the rows the "
                   "draft runs on its own output have none).")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def train_draft(model: str, output: Path, steps: int, sequences_per_step: int, max_tokens: int,
                lr: float, data_file: Path | None, max_prompts: int | None,
                max_new_tokens: int, prompts_per_topic: int, prompt_set: str,
                output_vocab: int, responses_artifact: Path | None, token_target: str,
                token_weight: float, feature_layers: tuple[int, ...], feature_dropout: float,
                seed: int) -> None:
    """Train an EAGLE-style draft layer for MODEL on its own responses (frozen backbone)."""
    from edgert.train.distill import DistillOptions
    from edgert.train.draft_loop import DraftTrainOptions
    from edgert.train.train_draft import TrainDraftOptions, train_draft_for_model

    options = TrainDraftOptions(
        train=DraftTrainOptions(output_vocab=output_vocab, steps=steps,
                                sequences_per_step=sequences_per_step, max_tokens=max_tokens,
                                lr=lr, token_weight=token_weight, token_target=token_target,
                                feature_layers=feature_layers,
                                feature_dropout=feature_dropout, seed=seed),
        distill=DistillOptions(max_new_tokens=max_new_tokens, seed=seed),
        data_file=data_file, max_prompts=max_prompts, prompts_per_topic=prompts_per_topic,
        prompt_set=prompt_set, responses_artifact=responses_artifact)
    train_draft_for_model(model, output, options)


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
@click.option("--backend", default="ort", show_default=True,
              help="ort (ONNX Runtime) or tvm (needs `edgert compile` first).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Intra-op threads (0 = the runtime's default).")
@click.option("--speculative", default=None,
              help="Drafters verified each step: off, medusa, draft (the artifact's draft "
                   "layer), lookup (copy from the prompt and output), or a combination such "
                   "as draft+lookup [default: the artifact's].")
@click.option("--no-medusa", is_flag=True, help="Same as --speculative off.")
@click.option("--acceptance", type=click.Choice(["rejection", "typical"]), default="rejection",
              show_default=True,
              help="When sampling: rejection keeps speculative output distributed as plain "
                   "sampling; typical accepts more (Medusa's typical acceptance).")
@friendly_errors
def run(artifact: Path, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
        top_k: int, seed: int | None, raw: bool, as_json: bool, backend: str, device: str,
        threads: int, speculative: str | None, no_medusa: bool, acceptance: str) -> None:
    """Generate text from ARTIFACT for one prompt (Medusa decoding when it has heads)."""
    from edgert.runtime.engine import load

    if no_medusa and speculative not in (None, "off"):
        raise click.UsageError("--no-medusa is --speculative off; pass one of them")
    engine = load(artifact, backend=backend, device=device, threads=threads)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, seed=seed, chat=not raw,
                  speculative="off" if no_medusa else speculative, acceptance=acceptance)
    if as_json:
        click.echo(json.dumps(engine.generate(prompt, **kwargs).to_dict()))
        return
    stats: dict = {}
    for piece in engine.stream(prompt, stats=stats, **kwargs):
        click.echo(piece, nl=False)
    click.echo()
    mode = stats.get("speculative", "off")
    spec = f", {mode} {stats['mean_accepted']:.2f} tokens/step" if mode != "off" else ""
    click.echo(f"[{stats['new_tokens']} tokens, prefill {stats['prefill_ms']:.0f} ms, "
               f"decode {stats['decode_tokens_per_s']:.1f} tok/s{spec}]", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--parallel", type=int, default=1, show_default=True,
              help="Sequence slots: 1 decodes one request at a time with speculative "
                   "decoding; N > 1 decodes up to N requests together (batched, ort "
                   "backend), in the same fixed KV cache.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY'.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests waiting for a slot before the server answers 429.")
@click.option("--backend", default="ort", show_default=True, help="ort or tvm.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Intra-op threads (0 = the runtime's default).")
@click.option("--prefix-reuse/--no-prefix-reuse", default=True, show_default=True,
              help="Prefill only what a prompt adds to a cached prefix (the same system "
                   "prompt, the next turn of a chat); usage.prompt_tokens_details."
                   "cached_tokens reports it.")
@friendly_errors
def serve(artifact: Path, host: str, port: int, parallel: int, api_key: str | None,
          max_queue: int, backend: str, threads: int, prefix_reuse: bool) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/models, /health, /metrics)."""
    import logging

    from edgert.serve.server import serve_artifact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve_artifact(artifact, host, port, parallel=parallel, api_key=api_key,
                   max_queue=max_queue, backend=backend, threads=threads,
                   prefix_reuse=prefix_reuse)


@main.command("eval-heads")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, exists=True),
              default=None, help="Text file, one prompt per line (default: edgert's held-out "
                                 "prompts, never used in training).")
@click.option("--max-new-tokens", type=int, default=96, show_default=True,
              help="Greedy continuation length per prompt.")
@click.option("--json", "as_json", is_flag=True, help='Print {"top1": [...], "top5": [...]}.')
@friendly_errors
def eval_heads(artifact: Path, prompts_file: Path | None, max_new_tokens: int,
               as_json: bool) -> None:
    """Per-head top-1/top-5 accuracy of ARTIFACT's Medusa heads against its own greedy output."""
    from tqdm import tqdm

    from edgert.runtime.engine import load
    from edgert.train.eval_heads import evaluate_heads
    from edgert.train.prompts import heldout_prompts

    engine = load(artifact)
    prompts = ([line for line in prompts_file.read_text().splitlines() if line.strip()]
               if prompts_file else heldout_prompts())
    with tqdm(total=len(prompts), desc="eval-heads", unit="prompt", disable=as_json) as bar:
        acc = evaluate_heads(engine, prompts, max_new_tokens, bar.update)
    if as_json:
        click.echo(json.dumps(acc.to_dict()))
        return
    click.echo(f"{acc.prompts} prompts ({acc.skipped} too long for the KV capacity skipped), "
               f"greedy continuation of up to {max_new_tokens} tokens")
    click.echo("head | predicts | top-1  | top-5  | positions")
    for i, (t1, t5, n) in enumerate(zip(acc.top1, acc.top5, acc.positions)):
        click.echo(f"{i:4d} | t+{i + 2:<6d} | {t1:.4f} | {t5:.4f} | {n}")


@main.command("eval-draft")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, exists=True),
              default=None, help="Text file, one prompt per line (default: edgert's held-out "
                                 "prompts, never used in training).")
@click.option("--max-new-tokens", type=int, default=96, show_default=True,
              help="Greedy continuation length per prompt.")
@click.option("--depth", type=int, default=4, show_default=True,
              help="Draft steps evaluated at each position.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"top1": [...], "accept": [...], "tokens_per_step": ...}.')
@friendly_errors
def eval_draft(artifact: Path, prompts_file: Path | None, max_new_tokens: int, depth: int,
               as_json: bool) -> None:
    """Top-1 of ARTIFACT's draft layer at each draft step against its own greedy output."""
    from tqdm import tqdm

    from edgert.runtime.engine import load
    from edgert.train.eval_draft import evaluate_draft
    from edgert.train.prompts import heldout_prompts

    engine = load(artifact)
    prompts = ([line for line in prompts_file.read_text().splitlines() if line.strip()]
               if prompts_file else heldout_prompts())
    with tqdm(total=len(prompts), desc="eval-draft", unit="prompt", disable=as_json) as bar:
        acc = evaluate_draft(engine, prompts, max_new_tokens, bar.update, depth)
    if as_json:
        click.echo(json.dumps(acc.to_dict()))
        return
    click.echo(f"{acc.prompts} prompts ({acc.skipped} too long for the KV capacity skipped), "
               f"{acc.positions} positions, greedy continuation of up to {max_new_tokens} tokens")
    click.echo("step | top-1  | accepted (previous steps right)")
    for k, (t1, a) in enumerate(zip(acc.top1, acc.accept)):
        click.echo(f"{k + 1:4d} | {t1:.4f} | {a:.4f}")
    click.echo(f"tokens per verification step, the whole chain verified: "
               f"{acc.tokens_per_step:.3f}")


@main.command("tune-tree")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--drafter", type=click.Choice(["auto", "medusa", "draft"]), default="auto",
              show_default=True,
              help="Whose tree: the Medusa heads' static tree, or the draft layer's dynamic "
                   "tree (depth, beam, top-k, node budget); auto: the draft layer's when the "
                   "artifact has one, else the heads'.")
@click.option("--max-nodes", type=int, default=None,
              help="Largest tree considered (nodes after the root). [default: 64 Medusa, "
                   "12 draft]")
@click.option("--prompts", "max_prompts", type=int, default=24, show_default=True,
              help="How many held-out prompts measure the drafter's accuracy.")
@click.option("--backend", default="ort", show_default=True,
              help="The backend to tune for (ort or tvm: a tree tuned on one is used by that "
                   "backend only).")
@click.option("--save", type=click.Path(path_type=Path), default=None,
              help="Also write the tree (with what it was tuned for) to this JSON file.")
@click.option("--dry-run", is_flag=True, help="Report only; leave the artifact unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@friendly_errors
def tune_tree_cmd(artifact: Path, drafter: str, max_nodes: int | None, max_prompts: int,
                  backend: str, save: Path | None, dry_run: bool, as_json: bool) -> None:
    """Measure the drafter's accuracy and verification latency here; store the fastest tree
    in ARTIFACT's manifest."""
    from tqdm import tqdm

    from edgert.runtime.engine import load
    from edgert.train.prompts import heldout_prompts

    engine = load(artifact, backend=backend)
    if drafter == "auto":
        drafter = "draft" if engine.has_draft else "medusa"
    if drafter == "draft" and not engine.has_draft:
        raise ArtifactError(f"{artifact} has no draft layer; tune the Medusa tree "
                                   "(--drafter medusa) or export with a draft")
    if drafter == "medusa" and not engine.has_medusa:
        raise ArtifactError(f"{artifact} has no Medusa heads; tune the draft layer's "
                                   "tree (--drafter draft) or export with heads")
    prompts = heldout_prompts()[:max_prompts]
    with tqdm(total=len(prompts), desc=f"{drafter} accuracy", unit="prompt",
              disable=as_json) as bar:
        if drafter == "draft":
            from edgert.train.tune_draft_tree import tune_draft_tree

            record = tune_draft_tree(engine, prompts, max_nodes or 12, write=not dry_run,
                                     progress=bar.update)
        else:
            from edgert.train.tune_tree import tune_tree

            record = tune_tree(engine, prompts, max_nodes or 64, write=not dry_run,
                               progress=bar.update)
    if save:
        save.write_text(json.dumps({k: v for k, v in record.items() if k != "curve"},
                                   indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(record))
        return
    if drafter == "draft":
        _report_draft_tree(record, artifact, dry_run)
        return
    tuned = record["tuned_for"]
    click.echo(f"plain step {tuned['plain_step_ms']:.1f} ms; heads {tuned['heads_ms']:.1f} ms")
    click.echo("nodes | expected tokens/step | step ms | predicted tok/s")
    for c in record["curve"]:
        if c["nodes"] in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) or c["nodes"] == record["nodes"]:
            mark = "  <- chosen" if c["nodes"] == record["nodes"] else ""
            click.echo(f"{c['nodes']:5d} | {c['expected_tokens']:20.2f} | {c['step_ms']:7.1f} | "
                       f"{c['tokens_per_s']:15.1f}{mark}")
    click.echo(("would write" if dry_run else "wrote") + f" tree '{record['name']}' "
               f"({record['nodes']} nodes) to {artifact}")


def _report_draft_tree(record: dict, artifact: Path, dry_run: bool) -> None:
    """The draft tree's table: the best budget of each shape, the chosen one marked."""
    tuned = record["tuned_for"]
    click.echo(f"plain step {tuned['plain_step_ms']:.1f} ms"
               + ("; chains only (int8 activations)" if tuned["chains_only"] else ""))
    click.echo("depth | beam | topk | budget | expected tokens/step | step ms | predicted tok/s")
    best: dict = {}
    for c in record["curve"]:
        shape = (c["depth"], c["beam"], c["topk"])
        if shape not in best or c["tokens_per_s"] > best[shape]["tokens_per_s"]:
            best[shape] = c
    chosen = tuple(record[k] for k in ("depth", "beam", "topk", "budget"))
    for c in sorted(best.values(), key=lambda c: -c["tokens_per_s"]):
        row = (c["depth"], c["beam"], c["topk"], c["budget"])
        mark = "  <- chosen" if row == chosen else ""
        click.echo(f"{row[0]:5d} | {row[1]:4d} | {row[2]:4d} | {row[3]:6d} | "
                   f"{c['expected_tokens']:20.2f} | {c['step_ms']:7.1f} | "
                   f"{c['tokens_per_s']:15.1f}{mark}")
    click.echo(("would write" if dry_run else "wrote") + " the draft tree (depth "
               f"{chosen[0]}, beam {chosen[1]}, top-{chosen[2]}, {chosen[3]} nodes) to "
               f"{artifact}")


if __name__ == "__main__":
    main()
