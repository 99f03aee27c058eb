"""``edgert eval-heads``: per-head top-1/top-5 against the backbone's own greedy continuation.

For each held-out prompt the artifact decodes greedily; at every decision position t (the last
prompt token, then each generated token) head i's candidates are compared with the token the
backbone itself produced at t+i+2. Runs entirely on the artifact (ONNX Runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgert.errors import ArtifactError
from edgert.train.prompts import heldout_prompts


@dataclass
class HeadAccuracy:
    top1: list[float]
    top5: list[float]
    positions: list[int]
    prompts: int
    skipped: int = 0
    rank_accuracy: list[list[float]] | None = None  # [K, k]: P(rank r of head i is right)

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "positions": self.positions,
                "prompts": self.prompts, "skipped": self.skipped,
                "rank_accuracy": self.rank_accuracy}


def greedy_with_hidden(engine, ids: list[int], max_new_tokens: int
                       ) -> tuple[list[int], np.ndarray]:
    """Greedy continuation ids and the hidden state at each decision position [m,H]."""
    engine.reset()
    budget = min(max_new_tokens, engine.capacity - len(ids))
    out = engine.prefill_ids(ids)
    tokens, hidden = [], []
    while True:
        hidden.append(out.hidden[-1])
        token = int(np.argmax(out.logits[-1]))
        tokens.append(token)
        if token in engine.eos_ids or len(tokens) >= budget:
            break
        out = engine.decode_token(token)
    return tokens, np.stack(hidden)


def evaluate_heads(engine, prompts: list[str] | None = None, max_new_tokens: int = 96,
                   progress: Callable[[int], None] = lambda n: None) -> HeadAccuracy:
    if not engine.has_heads:
        raise ArtifactError(f"artifact {engine.path} has no Medusa heads; export it with "
                            "--heads (or train some with `edgert train-heads`)")
    prompts = prompts if prompts is not None else heldout_prompts()
    num_heads = engine.manifest.medusa["num_heads"]
    hits1 = np.zeros(num_heads)
    hits5 = np.zeros(num_heads)
    rank_hits = np.zeros((num_heads, engine.manifest.medusa["topk"]))
    counts = np.zeros(num_heads, dtype=np.int64)
    skipped = 0
    for prompt in prompts:
        ids = engine.encode(prompt)
        if len(ids) + num_heads + 2 > engine.capacity:
            skipped += 1  # does not fit this artifact's KV capacity
            progress(1)
            continue
        tokens, hidden = greedy_with_hidden(engine, ids, max_new_tokens)
        # the root after hidden[j] is tokens[j], the backbone's own choice there
        ids, _ = engine.head_candidates(hidden, tokens)  # [K,m,k]
        m = len(tokens)
        for i in range(num_heads):
            # position j's head i predicts tokens[j + i + 1]
            valid = m - (i + 1)
            if valid <= 0:
                continue
            target = np.asarray(tokens[i + 1:])[:, None]  # [valid,1]
            cand = ids[i, :valid]
            hits1[i] += int((cand[:, 0:1] == target).sum())
            hits5[i] += int((cand[:, :5] == target).any(axis=1).sum())
            rank_hits[i] += (cand == target).sum(axis=0)
            counts[i] += valid
        progress(1)
    denom = np.maximum(counts, 1)
    return HeadAccuracy((hits1 / denom).round(4).tolist(), (hits5 / denom).round(4).tolist(),
                        counts.tolist(), len(prompts) - skipped, skipped,
                        (rank_hits / denom[:, None]).round(5).tolist())
