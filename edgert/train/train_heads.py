"""``edgert train-heads``: self-distillation data (cached) + Medusa-1 training -> heads dir."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgert.model.loaded import LoadedModel
from edgert.model.medusa_heads import MedusaHeads, save_heads
from edgert.model.sources import load_model
from edgert.train.distill import (
    DistillData,
    DistillOptions,
    PromptEncoder,
    build_hf_model,
    generate_responses,
    hidden_and_targets,
    read_data_file,
)
from edgert.train.heads_loop import StepReport, TrainOptions, train_heads
from edgert.train.prompts import training_prompts

CACHE_DIR = "cache"


@dataclass(frozen=True)
class TrainHeadsOptions:
    train: TrainOptions = field(default_factory=TrainOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    data_file: Path | None = None
    max_prompts: int | None = None  # None: the whole shipped prompt set
    prompts_per_topic: int = 3  # templates per topic in the shipped set (more: more data)
    prompt_set: str = "base"  # "wide" adds the training-only topics (edgert.train.prompts)


def _data_key(loaded: LoadedModel, options: TrainHeadsOptions) -> str:
    described = {"source": loaded.source, "distill": dataclasses.asdict(options.distill),
                 "num_heads": options.train.num_heads, "max_prompts": options.max_prompts,
                 **({"per_topic": options.prompts_per_topic}
                    if options.prompts_per_topic != 3 else {}),
                 **({"prompt_set": options.prompt_set} if options.prompt_set != "base" else {}),
                 "data_file": str(options.data_file) if options.data_file else None}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def build_distill_data(loaded: LoadedModel, options: TrainHeadsOptions,
                       log: Callable[[str], None]) -> DistillData:
    from tqdm import tqdm

    model = build_hf_model(loaded)
    encoder = PromptEncoder(loaded)
    if options.data_file is not None:
        pairs = read_data_file(options.data_file, encoder)
        log(f"using {len(pairs)} examples from {options.data_file}")
    else:
        prompts = training_prompts(options.prompts_per_topic,
                                   options.prompt_set)[:options.max_prompts]
        with tqdm(total=len(prompts), desc="backbone responses", unit="prompt") as bar:
            pairs = generate_responses(model, encoder, prompts, options.distill, bar.update)
    with tqdm(total=len(pairs), desc="hidden states", unit="seq") as bar:
        return hidden_and_targets(model, pairs, options.train.num_heads, progress=bar.update)


def train_heads_for_model(source: str, output: Path,
                          options: TrainHeadsOptions = TrainHeadsOptions(),
                          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                          ) -> MedusaHeads:
    """Train Medusa heads for ``source`` and write them to ``output`` (heads.json +
    heads.safetensors). Intermediate data and checkpoints live in ``output/cache``."""
    from tqdm import tqdm

    started = time.time()
    loaded = load_model(source)
    cache = output / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    data_path = cache / f"distill-{_data_key(loaded, options)}.pt"
    if data_path.is_file():
        log(f"using cached self-distillation data {data_path}")
        data = DistillData.load(data_path)
    else:
        data = build_distill_data(loaded, options, log)
        data.save(data_path)
    log(f"{len(data.hidden)} training positions from {data.sequences} sequences")
    checkpoint = cache / f"checkpoint-{data_path.stem}.pt"
    with tqdm(total=options.train.steps, desc="training heads", unit="step") as bar:
        running: list[float] = []

        def report(r: StepReport) -> None:
            running[:] = r.top1 if not running else [0.9 * a + 0.1 * b for a, b in
                                                     zip(running, r.top1)]
            bar.n = r.step
            bar.set_postfix(loss=f"{r.loss:.3f}",
                            top1="/".join(f"{a:.2f}" for a in running))
            bar.refresh()

        heads = train_heads(data, loaded.lm_head_t(), options.train, checkpoint,
                            report, loaded.embedding())
    recipe = {
        "method": "medusa-1 self-distillation (frozen backbone)",
        "source": loaded.source,
        "data": {"file": str(options.data_file) if options.data_file else None,
                 "prompts": "edgert.train.prompts.training_prompts",
                 "max_prompts": options.max_prompts,
                 "prompts_per_topic": options.prompts_per_topic,
                 "prompt_set": options.prompt_set, "sequences": data.sequences,
                 "positions": len(data.hidden), **dataclasses.asdict(options.distill)},
        "train": dataclasses.asdict(options.train),
        "seconds": round(time.time() - started, 1),
    }
    heads.config = dataclasses.replace(heads.config, training=recipe)
    save_heads(heads, output)
    log(f"wrote {output}")
    return heads
