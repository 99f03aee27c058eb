"""Medusa decode phases: propose a token tree, verify it in one forward, accept, commit.

One step, with N tree nodes after the root (the token the backbone chose last step):

    head_ids [K,k] (heads on the last accepted hidden state)
        └─ propose_tree ─> tokens [N+1]   (root + candidates placed by tree_indices)
    verify_tree: one forward of the N+1 tokens, tree mask, positions = length + depth
        └─> logits [N+1,V], hidden [N+1,H]; their K/V land at [length, length+N+1)
    accept_greedy / accept_typical ─> nodes (root..last accepted), next token
    commit: cache.commit_path(nodes) keeps only those entries (moved to the front)
    emit tokens[nodes[1:]] + next token; heads on hidden[nodes[-1]] for the next step

Greedy acceptance is lossless: a candidate is kept only if it equals the backbone's own argmax
after its accepted prefix, so the output is plain greedy decoding token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.medusa.tree_buffers import TreeBuffers
from edgert.runtime.backends import Backend, StepInputs, StepOutputs
from edgert.runtime.kv_cache import KVCacheBase
from edgert.runtime.sampling import SamplingParams, probabilities, select_token

DEFAULT_TYPICAL_THRESHOLD = 0.09
DEFAULT_TYPICAL_ALPHA = 0.3


@dataclass(frozen=True)
class Acceptance:
    nodes: np.ndarray  # tree node ids root..last accepted (offsets into the written entries)
    next_token: int  # the backbone's token after the last accepted node


def propose_tree(tree: TreeBuffers, root: int, head_ids: np.ndarray) -> np.ndarray:
    """Tree tokens [N+1]: the root, then each node's candidate (head depth-1, its rank)."""
    flat = np.concatenate([[root], head_ids[:, :tree.topk].reshape(-1)]).astype(np.int64)
    return flat[tree.tree_indices]


def verify_tree(backend: Backend, cache: KVCacheBase, tree: TreeBuffers, tokens: np.ndarray,
                mask: np.ndarray) -> StepOutputs:
    """One forward over the tree; its K/V are written at [length, length + N+1), uncommitted."""
    cache.check_room(tree.size)
    step = StepInputs(tokens[None], (cache.length + tree.depths)[None], mask,
                      np.arange(tree.size, dtype=np.int64), cache.length, tree.parents)
    return backend.forward(step)


def _longest(tree: TreeBuffers, ok: np.ndarray) -> tuple[int, np.ndarray]:
    """ok [leaves, D]: candidate j+1 of each retrieve path accepted. -> (best row, lengths)."""
    valid = tree.retrieve[:, 1:] >= 0
    lengths = np.cumprod(ok & valid, axis=1).sum(axis=1)
    best = int(np.argmax(lengths))
    return best, lengths


def accept_greedy(tree: TreeBuffers, tokens: np.ndarray, logits: np.ndarray) -> Acceptance:
    """Longest path whose every candidate equals the argmax at its parent."""
    pred = logits.argmax(axis=-1)  # [N+1]
    paths = np.maximum(tree.retrieve, 0)
    ok = tokens[paths[:, 1:]] == pred[paths[:, :-1]]
    best, lengths = _longest(tree, ok)
    nodes = tree.retrieve[best, :lengths[best] + 1]
    return Acceptance(nodes, int(pred[nodes[-1]]))


def accept_typical(tree: TreeBuffers, tokens: np.ndarray, logits: np.ndarray,
                   params: SamplingParams, rng: np.random.Generator,
                   threshold: float = DEFAULT_TYPICAL_THRESHOLD,
                   alpha: float = DEFAULT_TYPICAL_ALPHA) -> Acceptance:
    """Typical acceptance: keep a candidate when its probability under the backbone at its
    parent exceeds min(threshold, alpha * exp(-entropy)) and it survives the request's top-k
    and top-p filters there; the next token is sampled."""
    scaled = logits / np.float32(max(params.temperature, 1e-6))  # [N+1,V] float32
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    expd = np.exp(shifted)
    z = expd.sum(axis=-1)
    entropy = np.log(z) - (expd * shifted).sum(axis=-1) / z  # -sum p log p
    limit = np.minimum(threshold, alpha * np.exp(-entropy))  # [N+1]
    paths = np.maximum(tree.retrieve, 0)
    parent, child = paths[:, :-1], paths[:, 1:]
    ok = expd[parent, tokens[child]] / z[parent] > limit[parent]
    if params.top_k or params.top_p < 1.0:
        kept = {int(r): probabilities(logits[r], params) > 0 for r in np.unique(parent)}
        ok &= np.vectorize(lambda r, t: kept[int(r)][t], otypes=[bool])(parent, tokens[child])
    best, lengths = _longest(tree, ok)
    nodes = tree.retrieve[best, :lengths[best] + 1]
    return Acceptance(nodes, select_token(logits[nodes[-1]], params, rng))


def accept_rejection(tree: TreeBuffers, tokens: np.ndarray, logits: np.ndarray,
                     params: SamplingParams, rng: np.random.Generator) -> Acceptance:
    """Speculative sampling over a tree of fixed candidates: the output is distributed exactly
    as sampling from the backbone's (temperature, top-k, top-p) distribution token by token.

    At a node with distribution p, its children are tried in order: child c is accepted with
    probability p[c]; on rejection p loses c and is renormalized (the residual of a draft
    that put all its mass on c), and the next child is tried against it. When every child is
    rejected (or at a leaf) the next token is sampled from what remains of p."""
    children: list[list[int]] = [[] for _ in range(tree.size)]
    for node in range(1, tree.size):
        children[int(tree.parents[node])].append(node)
    node, nodes = 0, [0]
    while True:
        p = probabilities(logits[node], params)
        for child in children[node]:
            token = int(tokens[child])
            if rng.random() < p[token]:
                nodes.append(child)
                node = child
                break
            p[token] = 0.0
            p /= p.sum()
        else:
            return Acceptance(np.array(nodes, dtype=np.int64),
                              int(rng.choice(p.shape[-1], p=p)))


ACCEPTANCE = ("rejection", "typical")


def accept(tree, tokens, logits, params, rng, threshold, alpha,
           acceptance: str = "rejection") -> Acceptance:
    """Greedy acceptance at temperature 0; else ``acceptance``: "rejection" (exact) or
    "typical" (Medusa's, with the thresholds)."""
    if params.greedy:
        return accept_greedy(tree, tokens, logits)
    if acceptance == "typical":
        return accept_typical(tree, tokens, logits, params, rng, threshold, alpha)
    return accept_rejection(tree, tokens, logits, params, rng)
