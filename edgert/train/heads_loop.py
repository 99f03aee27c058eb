"""Medusa-1 head training on cached hidden states (the backbone is frozen and not run here).

loss = sum_i decay^i * CE(head_i(h_t), a_{t+i+1})   (decay 0.8, as in the Medusa paper)
AdamW, lr 1e-3, linear warmup over the first 10% of steps then cosine decay.
Deterministic under a seed; checkpoints every ``checkpoint_every`` steps and resumes from one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgert.errors import ConfigError
from edgert.model.medusa_heads import MedusaConfig, MedusaHeads
from edgert.train.distill import IGNORE, DistillData


@dataclass(frozen=True)
class TrainOptions:
    num_heads: int = 4
    num_layers: int = 1
    projection: str = "shared"
    condition: str = "none"  # "token": heads also read the tree root's embedding
    output_vocab: int = 0  # V' > 0: heads score only the V' most frequent target tokens
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.0
    decay: float = 0.8
    seed: int = 0
    checkpoint_every: int = 50


@dataclass
class StepReport:
    step: int
    loss: float
    top1: list[float]


def lr_at(step: int, options: TrainOptions) -> float:
    warm = max(1, int(options.steps * options.warmup))
    if step < warm:
        return options.lr * (step + 1) / warm
    progress = (step - warm) / max(1, options.steps - warm)
    return options.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Rows of step ``step``: epoch-wise permutations, a pure function of (step, seed)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * batch:(k + 1) * batch]


def most_frequent(tokens: torch.Tensor, count: int, vocab: int) -> torch.Tensor:
    """The ``count`` most frequent ids in ``tokens`` (ties: lower id), ascending."""
    counts = torch.bincount(tokens, minlength=vocab)
    order = torch.sort(-counts, stable=True).indices  # stable: ties keep the lower id first
    return torch.sort(order[:count]).values


def frequent_tokens(data: DistillData, count: int, vocab: int) -> torch.Tensor:
    """The ``count`` most frequent target tokens of ``data`` (ties: lower id), ascending."""
    return most_frequent(data.targets[data.targets != IGNORE], count, vocab)


def to_projected(targets: torch.Tensor, vocab_ids: torch.Tensor | None, vocab: int
                 ) -> torch.Tensor:
    """Targets as positions in the heads' logits; tokens outside ``vocab_ids`` -> IGNORE."""
    if vocab_ids is None:
        return targets
    position = torch.full((vocab,), IGNORE, dtype=torch.int64)
    position[vocab_ids] = torch.arange(len(vocab_ids))
    return torch.where(targets == IGNORE, targets, position[targets.clamp(min=0)])


def head_losses(logits: torch.Tensor, targets: torch.Tensor,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Per-head CE [K] and top-1 accuracy. logits [K,B,V'], targets [B,K] (positions in the
    logits, IGNORE where absent or not scoreable); ``valid`` [B,K] marks the positions that
    count for accuracy (default: targets != IGNORE), so a target outside an output vocab
    counts as a miss."""
    losses, top1 = [], []
    valid = targets != IGNORE if valid is None else valid
    for i in range(logits.shape[0]):
        t = targets[:, i]
        losses.append(nn.functional.cross_entropy(logits[i], t, ignore_index=IGNORE)
                      if bool((t != IGNORE).any()) else logits[i].sum() * 0)
        hits = (logits[i].argmax(-1) == t) & (t != IGNORE)
        top1.append(float(hits.sum()) / max(1, int(valid[:, i].sum())))
    return torch.stack(losses), top1


def _checkpoint_compatible(saved: dict, options: TrainOptions) -> None:
    theirs = dict(saved["options"])
    mine = dataclasses.asdict(options)
    for key in ("num_heads", "num_layers", "projection", "condition", "output_vocab",
                "batch_size", "seed", "lr", "decay", "steps", "warmup"):
        if theirs.get(key) != mine[key]:
            raise ConfigError(f"checkpoint was made with {key}={theirs.get(key)!r}, this run "
                              f"uses {mine[key]!r}; pass the same options or delete the "
                              "checkpoint to start over")


def train_heads(data: DistillData, lm_head_t: torch.Tensor, options: TrainOptions,
                checkpoint: Path | None = None,
                report: Callable[[StepReport], None] = lambda r: None,
                embedding: torch.Tensor | None = None) -> MedusaHeads:
    """Train heads on ``data``; resumes from ``checkpoint`` when it exists.

    ``embedding`` [V, H] is the backbone's token embedding, needed with
    ``condition="token"`` (the heads read the root token's embedding)."""
    if data.targets.shape[1] < options.num_heads:
        raise ConfigError(f"the data has targets for {data.targets.shape[1]} heads, "
                          f"{options.num_heads} requested; rebuild the data")
    if options.condition == "token" and (data.roots is None or embedding is None):
        raise ConfigError("token-conditioned heads need the data's root tokens and the "
                          "backbone's embedding; rebuild the self-distillation data (delete "
                          "the cached distill-*.pt)")
    torch.manual_seed(options.seed)
    vocab = lm_head_t.shape[1]
    vocab_ids = frequent_tokens(data, options.output_vocab, vocab) if options.output_vocab else None
    config = MedusaConfig(options.num_heads, options.num_layers, data.hidden.shape[1],
                          vocab, options.projection, options.condition, options.output_vocab)
    heads = MedusaHeads(config, lm_head_t, vocab_ids)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=options.lr,
                                  weight_decay=options.weight_decay)
    lm_head_t = lm_head_t.detach()
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        _checkpoint_compatible(saved, options)
        heads.load_state_dict(saved["heads"])
        optimizer.load_state_dict(saved["optimizer"])
        start = int(saved["step"])
    weights = torch.tensor([options.decay ** i for i in range(options.num_heads)])
    targets_all = data.targets[:, :options.num_heads]
    projected_all = to_projected(targets_all, vocab_ids, vocab)
    projection = heads.select_vocab(lm_head_t)  # [H, V'], gathered once
    heads.train()
    for step in range(start, options.steps):
        rows = torch.from_numpy(batch_indices(step, len(data.hidden), options.batch_size,
                                              options.seed))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, options)
        roots = embedding[data.roots[rows]] if options.condition == "token" else None
        logits = heads(data.hidden[rows], projection, roots)  # [K,B,V']
        losses, top1 = head_losses(logits, projected_all[rows], targets_all[rows] != IGNORE)
        loss = (losses * weights).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report(StepReport(step + 1, loss.item(), top1))
        done = step + 1
        if checkpoint is not None and (done % options.checkpoint_every == 0
                                       or done == options.steps):
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"step": done, "heads": heads.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "options": dataclasses.asdict(options)}, tmp)
            tmp.replace(checkpoint)
    heads.eval()
    return heads
