"""Token selection: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise GenerationError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int) or self.seed < 0):
            raise GenerationError(f"seed must be a non-negative integer or None, got "
                                  f"{self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Filtered, renormalised distribution over the vocabulary (float64)."""
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        kept = nucleus(probs, params.top_p)
        filtered = np.zeros_like(probs)
        filtered[kept] = probs[kept]
        probs = filtered / filtered.sum()
    return probs


NUCLEUS_HEAD = 64  # candidates sorted first; quadrupled until their mass reaches top_p


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of most likely tokens whose mass reaches ``top_p`` (ties in stable
    order: the lower index first), as a full stable sort would pick it, in O(V): only the
    ``m`` most likely tokens are sorted (``argpartition``), ``m`` growing until their mass
    reaches ``top_p``. A set that would end inside a tie with tokens outside the sorted
    head is decided by the full sort."""
    v = probs.shape[-1]
    m = NUCLEUS_HEAD
    while m < v:
        head = np.argpartition(-probs, m - 1)[:m]
        order = head[np.lexsort((head, -probs[head]))]  # descending, ties by index
        cumulative = np.cumsum(probs[order])
        if cumulative[-1] >= top_p:
            kept = order[cumulative - probs[order] < top_p]
            boundary = probs[order[-1]]
            if probs[kept[-1]] > boundary or np.count_nonzero(probs == boundary) == \
                    np.count_nonzero(probs[order] == boundary):
                return kept
            break  # the set ends in a tie that reaches outside the head
        m *= 4
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    return order[cumulative - probs[order] < top_p]


def select_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token from one position's logits [V]."""
    if params.greedy:
        return int(np.argmax(logits))
    probs = probabilities(logits, params)
    return int(rng.choice(probs.shape[-1], p=probs))
