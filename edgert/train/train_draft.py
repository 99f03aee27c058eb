"""``edgert train-draft``: self-distilled sequences (cached) + draft-layer training -> draft dir.

The sequences come from the heads' data builder (``edgert.train.distill``: the backbone's own
answers to the shipped prompts, or ``--data``); the backbone's answers and the features are
cached in ``output/cache`` (keyed by what made them), so a rerun, or a resumed training, skips
them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgert.export.draft_layer import DraftLayer, save_draft
from edgert.model.draft_config import DraftConfig
from edgert.model.loaded import LoadedModel
from edgert.model.sources import load_model
from edgert.train.distill import (
    DistillOptions,
    PromptEncoder,
    build_hf_model,
    generate_responses,
    read_data_file,
)
from edgert.train.draft_data import DraftData, sequence_features
from edgert.train.draft_loop import DraftStepReport, DraftTrainOptions, train_draft
from edgert.train.prompts import training_prompts

CACHE_DIR = "cache"


@dataclass(frozen=True)
class TrainDraftOptions:
    train: DraftTrainOptions = field(default_factory=DraftTrainOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    data_file: Path | None = None
    max_prompts: int | None = None  # None: the whole shipped prompt set
    prompts_per_topic: int = 3  # templates per topic in the shipped set (more: more data)
    prompt_set: str = "base"  # "wide" adds the training-only topics (edgert.train.prompts)
    # an exported artifact of the same model that answers the prompts (parallel slots, about
    # 4x faster than transformers on a CPU); None: transformers' generate
    responses_artifact: Path | None = None


def responses_key(loaded: LoadedModel, options: TrainDraftOptions) -> str:
    """What the sequences depend on (the prompts, the answering, ``--data``)."""
    described = {"source": loaded.source, "distill": dataclasses.asdict(options.distill),
                 "max_prompts": options.max_prompts, "per_topic": options.prompts_per_topic,
                 **({"prompt_set": options.prompt_set} if options.prompt_set != "base" else {}),
                 "data_file": str(options.data_file) if options.data_file else None,
                 **({"responses_artifact": str(options.responses_artifact)}
                    if options.responses_artifact else {})}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def data_key(loaded: LoadedModel, options: TrainDraftOptions) -> str:
    """What the features depend on: the sequences, and the residual layers they carry."""
    key = responses_key(loaded, options)
    if not options.train.feature_layers:
        return key
    return f"{key}-layers" + "_".join(str(k) for k in options.train.feature_layers)


def sequences(loaded: LoadedModel, model, options: TrainDraftOptions, cache: Path,
              log: Callable[[str], None]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) pairs: ``--data``, else the backbone's own answers (cached
    as ``responses-<key>.json``)."""
    from tqdm import tqdm

    encoder = PromptEncoder(loaded)
    if options.data_file is not None:
        pairs = read_data_file(options.data_file, encoder)
        log(f"using {len(pairs)} examples from {options.data_file}")
        return pairs
    path = cache / f"responses-{responses_key(loaded, options)}.json"
    if path.is_file():
        log(f"using cached backbone responses {path}")
        return [tuple(pair) for pair in json.loads(path.read_text())]
    prompts = training_prompts(options.prompts_per_topic,
                                   options.prompt_set)[:options.max_prompts]
    with tqdm(total=len(prompts), desc="backbone responses", unit="prompt") as bar:
        if options.responses_artifact is not None:
            from edgert.runtime.engine import load
            from edgert.train.batch_responses import generate_responses_batched

            engine = load(options.responses_artifact)
            pairs = generate_responses_batched(engine, encoder, prompts, options.distill,
                                               progress=bar.update)
            del engine
        else:
            pairs = generate_responses(model, encoder, prompts, options.distill, bar.update)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(pairs))
    tmp.replace(path)
    return pairs


def draft_data(loaded: LoadedModel, options: TrainDraftOptions, cache: Path,
               log: Callable[[str], None]) -> DraftData:
    """The features of every sequence (cached as ``draft-data-<key>.pt``)."""
    from tqdm import tqdm

    path = cache / f"draft-data-{data_key(loaded, options)}.pt"
    if path.is_file():
        log(f"using cached draft data {path}")
        return DraftData.load(path)
    model = build_hf_model(loaded)
    pairs = sequences(loaded, model, options, cache, log)
    with tqdm(total=len(pairs), desc="backbone features", unit="seq") as bar:
        data = sequence_features(model, pairs, progress=bar.update,
                                 feature_layers=options.train.feature_layers)
    data.save(path)
    return data


def train_draft_for_model(source: str, output: Path,
                          options: TrainDraftOptions = TrainDraftOptions(),
                          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                          ) -> DraftLayer:
    """Train a draft layer for ``source`` and write it to ``output`` (draft.json +
    draft.safetensors). Intermediate data and checkpoints live in ``output/cache``."""
    from tqdm import tqdm

    started = time.time()
    loaded = load_model(source)
    # refuse layers the backbone lacks now, not after an hour of answers and features
    DraftConfig.for_backbone(loaded.config, options.train.output_vocab,
                             options.train.feature_layers)
    cache = output / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    data = draft_data(loaded, options, cache, log)
    log(f"{len(data.tokens)} positions in {data.sequences} sequences")
    checkpoint = cache / f"draft-checkpoint-{data_key(loaded, options)}.pt"
    with tqdm(total=options.train.steps, desc="training draft layer", unit="step") as bar:
        running: list[float] = []

        def report(r: DraftStepReport) -> None:
            running[:] = [r.top1 if not running else 0.9 * running[0] + 0.1 * r.top1]
            bar.n = r.step
            bar.set_postfix(loss=f"{r.loss:.3f}", top1=f"{running[0]:.3f}")
            bar.refresh()

        draft = train_draft(data, loaded.config, loaded.lm_head_t(), options.train, checkpoint,
                            report, None if loaded.config.tie_word_embeddings
                            else loaded.embedding())
    recipe = {
        "method": ("EAGLE-3-style multi-layer features" if options.train.feature_layers
                   else "EAGLE-1-style") + " draft layer, self-distillation (frozen backbone)",
        "source": loaded.source,
        "data": {"file": str(options.data_file) if options.data_file else None,
                 "prompts": "edgert.train.prompts.training_prompts",
                 "max_prompts": options.max_prompts,
                 "prompts_per_topic": options.prompts_per_topic,
                 "prompt_set": options.prompt_set,
                 "sequences": data.sequences, "positions": len(data.tokens),
                 **dataclasses.asdict(options.distill)},
        "train": dataclasses.asdict(options.train),
        "seconds": round(time.time() - started, 1),
    }
    draft.config = dataclasses.replace(draft.config, training=recipe)
    save_draft(draft, output)
    log(f"wrote {output}")
    return draft
