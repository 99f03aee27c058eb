"""Draft-layer training on cached features (EAGLE-1 style; the backbone is frozen, not run).

Row t of a sequence reads (h_t, x_{t+1}) at position t+1 and is trained towards the
backbone's next feature and token::

    loss = feature_weight * SmoothL1(f_{t+1}, h_{t+1}) + token_weight * CE(logits(f_{t+1}), target)

``token_target`` "argmax": the target is a_{t+1}, the backbone's own argmax at t+1 (its choice
of x_{t+2}); "distribution": the backbone's whole next-token distribution there,
softmax(h_{t+1} W) over the output vocabulary (computed from the cached feature: no extra data),
a soft-label cross-entropy that also teaches the runners-up, as EAGLE's classification loss
does. The input features get
uniform noise (``noise`` x their standard deviation), as EAGLE does, so that the layer
tolerates its own imperfect features when it drafts several tokens. A multi-layer draft
(``feature_layers``, EAGLE-3's low/middle/high features) also reads the residual stream after
those layers; ``feature_dropout`` of the rows lose it (zeros), as the rows the draft runs on
its own output do at run time. Each step packs
``sequences_per_step`` whole sequences into one row of at most ``max_tokens`` tokens, a
block-diagonal causal bias keeping them apart. AdamW with linear warmup and cosine decay;
deterministic under a seed; checkpoints every ``checkpoint_every`` steps and resumes from one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgert.errors import ConfigError
from edgert.export.decoder import MASK_VALUE
from edgert.export.draft_layer import DraftLayer
from edgert.model.config import DecoderConfig
from edgert.model.draft_config import DraftConfig
from edgert.train.distill import IGNORE
from edgert.train.draft_data import DraftData
from edgert.train.heads_loop import batch_indices, lr_at, most_frequent, to_projected


@dataclass(frozen=True)
class DraftTrainOptions:
    output_vocab: int = 8192  # 0: the whole vocabulary
    steps: int = 2000
    sequences_per_step: int = 8
    max_tokens: int = 2048  # one packed row
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.0
    feature_weight: float = 1.0
    token_weight: float = 0.1
    token_target: str = "argmax"  # or "distribution" (TOKEN_TARGETS)
    noise: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50
    feature_layers: tuple[int, ...] = ()  # residual states in the feature (data built so)
    feature_dropout: float = 0.1  # share of rows trained without them (multi-layer only)


TOKEN_TARGETS = ("argmax", "distribution")


@dataclass
class DraftStepReport:
    step: int
    loss: float
    top1: float  # the step's first-draft-step top-1 against the backbone's argmax


@dataclass
class PackedRows:
    """One step's input: the rows of several sequences in one [1, q] row."""

    features: torch.Tensor  # [1,q,F] h_t (then the residual states, if any)
    tokens: torch.Tensor  # [1,q] x_{t+1}
    positions: torch.Tensor  # [1,q] t+1
    bias: torch.Tensor  # [1,1,q,q] block-diagonal causal
    target_features: torch.Tensor  # [q,F] h_{t+1} (the first H columns are the target)
    target_tokens: torch.Tensor  # [q] a_{t+1}


def pack(data: DraftData, sequences: list[int], max_tokens: int) -> PackedRows:
    """Rows t = 0..L-2 of each sequence, in order, cut at ``max_tokens`` rows in all."""
    rows, segment = [], []
    for number, s in enumerate(sequences):
        span = data.span(s)
        length = span.stop - span.start - 1  # rows of this sequence
        take = min(length, max_tokens - len(rows))
        if take <= 0:
            break
        rows += range(span.start, span.start + take)
        segment += [number] * take
    index = torch.tensor(rows, dtype=torch.int64)
    seg = torch.tensor(segment)
    starts = torch.tensor([data.offsets[s] for s in sequences[:int(seg[-1]) + 1]])
    positions = index - starts[seg] + 1
    q = len(rows)
    same = seg[:, None] == seg[None, :]
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    bias = torch.where(same & causal, 0.0, MASK_VALUE)[None, None]
    return PackedRows(data.hidden[index].float()[None], data.tokens[index + 1][None],
                      positions[None], bias, data.hidden[index + 1].float(),
                      data.argmax[index + 1])


def embed_tokens(ids: torch.Tensor, lm_head_t: torch.Tensor, config: DecoderConfig,
                 embedding: torch.Tensor | None = None) -> torch.Tensor:
    """The backbone's embedding of ``ids`` [1,q] -> [1,q,H] (tied: lm_head_t's columns)."""
    rows = (lm_head_t.index_select(1, ids.reshape(-1)).t() if embedding is None
            else embedding[ids.reshape(-1)])
    rows = rows * config.embedding_multiplier if config.embedding_multiplier != 1.0 else rows
    return rows.unsqueeze(0)


def draft_forward(draft: DraftLayer, features: torch.Tensor, token_embeddings: torch.Tensor,
                  positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The draft's features [1,q,H] for rows with no cached prefix (training, references)."""
    cfg = draft.config.decoder_config
    empty = torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim)
    out, _, _ = draft(features, token_embeddings, draft.rotary(positions), empty, empty, bias)
    return out


def token_loss(logits: torch.Tensor, targets: torch.Tensor, target_logits: torch.Tensor | None
               ) -> torch.Tensor:
    """The draft's token loss over rows [q, V']: cross-entropy against ``targets`` (positions
    in the logits, IGNORE where outside them) or, given the backbone's ``target_logits`` [q, V']
    over the same vocabulary, against its softmax (a soft-label cross-entropy)."""
    if target_logits is not None:
        target = torch.softmax(target_logits.float(), dim=-1)
        return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    if not bool((targets != IGNORE).any()):
        return logits.sum() * 0
    return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE)


def _checkpoint_compatible(saved: dict, options: DraftTrainOptions) -> None:
    theirs, mine = dict(saved["options"]), dataclasses.asdict(options)
    defaults = dataclasses.asdict(DraftTrainOptions())
    for key in mine:  # an option newer than the checkpoint: it was made with the default
        if key != "checkpoint_every" and theirs.get(key, defaults[key]) != mine[key]:
            raise ConfigError(f"checkpoint was made with {key}="
                              f"{theirs.get(key, defaults[key])!r}, this run "
                              f"uses {mine[key]!r}; pass the same options or delete the "
                              "checkpoint to start over")


def train_draft(data: DraftData, backbone: DecoderConfig, lm_head_t: torch.Tensor,
                options: DraftTrainOptions, checkpoint: Path | None = None,
                report: Callable[[DraftStepReport], None] = lambda r: None,
                embedding: torch.Tensor | None = None) -> DraftLayer:
    """Train a draft layer on ``data``; resumes from ``checkpoint`` when it exists.
    ``embedding`` [V,H]: the backbone's token embedding when not tied to ``lm_head_t``."""
    if data.sequences < 1:
        raise ConfigError("the draft data has no sequences; rebuild it")
    if options.token_target not in TOKEN_TARGETS:
        raise ConfigError(f"token_target must be one of {', '.join(TOKEN_TARGETS)}, got "
                          f"{options.token_target!r}")
    config = DraftConfig.for_backbone(backbone, options.output_vocab, options.feature_layers)
    if data.hidden.shape[1] != config.feature_size:
        raise ConfigError(f"the draft data's features are {data.hidden.shape[1]} wide, a draft "
                          f"with feature_layers {list(options.feature_layers)} reads "
                          f"{config.feature_size}; rebuild the data with the same layers")
    torch.manual_seed(options.seed)
    vocab = lm_head_t.shape[1]
    vocab_ids = (most_frequent(data.argmax, options.output_vocab, vocab)
                 if options.output_vocab else None)
    draft = DraftLayer(config, vocab_ids=vocab_ids)
    h = config.hidden_size
    optimizer = torch.optim.AdamW(draft.parameters(), lr=options.lr,
                                  weight_decay=options.weight_decay)
    lm_head_t = lm_head_t.detach()
    projection = draft.select_vocab(lm_head_t)  # [H, V'], gathered once
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        _checkpoint_compatible(saved, options)
        draft.load_state_dict(saved["draft"])
        optimizer.load_state_dict(saved["optimizer"])
        start = int(saved["step"])
    noise = options.noise * float(data.hidden[:65536, :h].float().std())
    per_step = min(options.sequences_per_step, data.sequences)
    draft.train()
    for step in range(start, options.steps):
        chosen = batch_indices(step, data.sequences, per_step, options.seed).tolist()
        rows = pack(data, chosen, options.max_tokens)
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
        features = rows.features.clone()
        features[..., :h] += (torch.rand(features[..., :h].shape, generator=generator)
                              * 2 - 1) * noise
        if options.feature_layers and options.feature_dropout > 0:
            kept = torch.rand(features.shape[1], generator=generator) >= options.feature_dropout
            features[..., h:] *= kept[None, :, None]
        embedded = embed_tokens(rows.tokens, lm_head_t, backbone, embedding)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, options)
        predicted = draft_forward(draft, features, embedded, rows.positions, rows.bias)[0]
        logits = draft.logits(predicted, projection)
        targets = to_projected(rows.target_tokens, vocab_ids, vocab)
        target_features = rows.target_features[:, :h]
        feature_loss = nn.functional.smooth_l1_loss(predicted, target_features)
        target_logits = None
        if options.token_target == "distribution":
            with torch.no_grad():
                target_logits = draft.logits(target_features, projection)
        token_part = token_loss(logits, targets, target_logits)
        loss = options.feature_weight * feature_loss + options.token_weight * token_part
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        top1 = float((logits.argmax(-1) == targets).float().mean())
        report(DraftStepReport(step + 1, loss.item(), top1))
        done = step + 1
        if checkpoint is not None and (done % options.checkpoint_every == 0
                                       or done == options.steps):
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"step": done, "draft": draft.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "options": dataclasses.asdict(options)}, tmp)
            tmp.replace(checkpoint)
    draft.eval()
    return draft
