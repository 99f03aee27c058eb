"""``edgert eval-draft``: the draft layer's top-1 at draft steps 1..depth against the
backbone's own greedy continuation.

For each held-out prompt the artifact decodes greedily, keeping the backbone's feature at
every position. Then, at every decision position (the backbone has chosen token y_j), the draft
runs as in decoding (its cache caught up on the true features, then its own chain) and its
chain d_1..d_depth is compared with y_{j+1}..y_{j+depth} (positions with fewer than ``depth``
tokens after them are left out). Reported per step k: ``top1`` =
P(d_k = y_{j+k}) and ``accept`` = P(d_k = y_{j+k} | d_1..d_{k-1} right), the share a greedy
verification accepts; ``tokens_per_step`` = 1 + the mean accepted chain length (tau, were
the whole chain verified every step). Runs entirely on the artifact (ONNX Runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgert.errors import ArtifactError
from edgert.runtime.draft import DraftState
from edgert.train.prompts import heldout_prompts


@dataclass
class DraftAccuracy:
    top1: list[float]
    accept: list[float]
    tokens_per_step: float
    positions: int
    prompts: int
    skipped: int = 0

    def to_dict(self) -> dict:
        return {"top1": self.top1, "accept": self.accept,
                "tokens_per_step": self.tokens_per_step, "positions": self.positions,
                "prompts": self.prompts, "skipped": self.skipped}


def greedy_with_features(engine, ids: list[int], max_new_tokens: int
                         ) -> tuple[list[int], np.ndarray]:
    """Greedy continuation y_1..y_m and the backbone's feature at every position of prompt +
    continuation but the last [P + m - 1, H]."""
    engine.reset()
    budget = min(max_new_tokens, engine.capacity - len(ids))
    out = engine.prefill_ids(ids)
    features, tokens = [out.features], []
    while True:
        token = int(np.argmax(out.logits[-1]))
        tokens.append(token)
        if token in engine.eos_ids or len(tokens) >= budget:
            break
        out = engine.decode_token(token)
        features.append(out.features[:1])
    return tokens, np.concatenate(features)


def evaluate_draft(engine, prompts: list[str] | None = None, max_new_tokens: int = 96,
                   progress: Callable[[int], None] = lambda n: None,
                   depth: int = 4) -> DraftAccuracy:
    """``depth`` draft steps per position (whatever the artifact drafts at run time)."""
    if not engine.has_draft:
        raise ArtifactError(f"artifact {engine.path} has no draft layer; export it with "
                            "--draft (train one with `edgert train-draft`)")
    prompts = prompts if prompts is not None else heldout_prompts()
    hits = np.zeros(depth)
    prefixes = np.zeros(depth + 1, dtype=np.int64)  # positions whose chain is right for p steps
    skipped = 0
    for prompt in prompts:
        ids = engine.encode(prompt)
        if len(ids) + depth + 2 > engine.capacity:
            skipped += 1
            progress(1)
            continue
        tokens, features = greedy_with_features(engine, ids, max_new_tokens)
        state = DraftState(engine.backend, depth)
        state.start(ids, tokens[0], features[:len(ids)])
        for j in range(len(tokens) - 1):
            chain = state.propose()
            target = tokens[j + 1:j + 1 + depth]
            if len(target) == depth:  # near the end there is less to compare with
                right = [k < len(chain) and chain[k] == target[k] for k in range(depth)]
                hits += right
                prefixes[right.index(False) if False in right else depth] += 1
            # the backbone commits y_{j+1}; its feature there is the next row's input
            state.accept([tokens[j + 1]], features[len(ids) + j:len(ids) + j + 1])
        progress(1)
    positions = int(prefixes.sum())
    if positions == 0:
        raise ArtifactError("no decision position to evaluate (every prompt was too long for "
                            "the artifact's KV capacity, or answered in one token)")
    reached = prefixes[::-1].cumsum()[::-1]  # reached[k]: chains right for at least k steps
    accept = [float(reached[k + 1] / reached[k]) if reached[k] else 0.0 for k in range(depth)]
    mean_prefix = float((prefixes * np.arange(depth + 1)).sum() / positions)
    return DraftAccuracy((hits / positions).round(4).tolist(), np.round(accept, 4).tolist(),
                         round(1 + mean_prefix, 4), positions, len(prompts) - skipped, skipped)
