"""Draft-layer training data: whole sequences with the backbone's features at every position.

The sequences are the heads' self-distillation pairs (``edgert.train.distill``: the frozen
backbone's own answers to the shipped prompts, or ``--data``), prompt and response together:
the draft layer attends over the positions before it, prompt included, as it does at run time.
One teacher-forced forward per sequence gives h_t (the final-norm hidden state) and a_t (the
backbone's argmax, its prediction of token t+1) at every position, and for a multi-layer
draft the residual stream after its ``feature_layers`` next to h_t. Features are stored fp16
(half the memory; the draft's inputs and targets, not its weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgert.train.distill import argmax_tokens, padded_states


@dataclass
class DraftData:
    """``tokens`` [N] int64, ``hidden`` [N, H] float16 (h_t; [N, (1+L)H] with L residual
    states after it), ``argmax`` [N] int64, concatenated over sequences; sequence s spans
    ``offsets[s]:offsets[s+1]``, its first ``prompt_lengths[s]`` tokens being the prompt."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    argmax: torch.Tensor
    offsets: torch.Tensor
    prompt_lengths: torch.Tensor

    @property
    def sequences(self) -> int:
        return len(self.offsets) - 1

    def span(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def save(self, path: Path) -> None:
        torch.save({"tokens": self.tokens, "hidden": self.hidden, "argmax": self.argmax,
                    "offsets": self.offsets, "prompt_lengths": self.prompt_lengths}, path)

    @classmethod
    def load(cls, path: Path) -> DraftData:
        data = torch.load(path, weights_only=True)
        return cls(data["tokens"], data["hidden"], data["argmax"], data["offsets"],
                   data["prompt_lengths"])


def sequence_features(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                      progress: Callable[[int], None] = lambda n: None,
                      feature_layers: tuple[int, ...] = ()) -> DraftData:
    """Teacher-forced forwards of ``model`` (a transformers causal LM) over each prompt +
    response; every position kept. ``feature_layers``: the residual stream after those
    layers joins each feature (transformers' ``hidden_states[k]``)."""
    tokens, hidden, argmax, lengths, prompts = [], [], [], [], []
    lm_head = model.lm_head.weight  # [V, H]
    hidden_size = lm_head.shape[1]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        seqs = [p + r for p, r in batch]
        states = padded_states(model, seqs, feature_layers)
        for row, ((prompt, _), seq) in enumerate(zip(batch, seqs)):
            h = states[row, :len(seq)]
            tokens.append(torch.tensor(seq, dtype=torch.int64))
            hidden.append(h.to(torch.float16))
            argmax.append(argmax_tokens(h[:, :hidden_size], lm_head))
            lengths.append(len(seq))
            prompts.append(len(prompt))
        progress(len(batch))
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return DraftData(torch.cat(tokens), torch.cat(hidden), torch.cat(argmax), offsets,
                     torch.tensor(prompts, dtype=torch.int64))
