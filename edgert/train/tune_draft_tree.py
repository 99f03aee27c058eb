"""The draft layer's tree for this artifact on this machine (``edgert tune-tree``).

speed(tree) ~ expected tokens per step / time per step, where
- expected tokens per step = 1 + the mean accepted length of the draft's tree, measured on
  held-out prompts: the backbone's greedy continuation of each prompt and its features are
  computed once (as ``edgert eval-draft`` does); then, position by position, the draft
  catches up one row (exactly as a step that accepted nothing would) and grows its tree from
  the true prefix; a tree's accepted length is the depth of its deepest node whose path spells
  the continuation (greedy verification accepts exactly that);
- time per step = the verification forward of the tree's nodes + the root (measured at a few
  sizes, ``tune_tree.measure_forward_ms``; for trees fitted by a line, as the candidates differ
  by a node or two, less than a shared machine's noise at one size; for chains interpolated,
  as at int8 activations two rows cost what one does) + the measured drafting time (the
  median ``propose_tree`` or ``propose`` call of the simulation itself).

Shapes (depth, beam, topk) are simulated one by one; a shape's budgets come from one growth
(the ``budget`` best nodes are a prefix of its score order). Where verification must be a
chain (``Engine.row_exact``: int8 activations, or a cache that cannot move entries) only
chains are candidates, and the tuned depth is the chain's length.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from edgert.artifact.io import update_manifest
from edgert.runtime.draft import DraftState
from edgert.speculative.dynamic_tree import DraftTree, DraftTreeParams
from edgert.train.eval_draft import greedy_with_features
from edgert.train.prompts import heldout_prompts
from edgert.train.tune_tree import interpolate, measure_forward_ms, tuned_summary

MAX_DEPTH = 4


@dataclass(frozen=True)
class DraftTreeChoice:
    params: DraftTreeParams
    expected_tokens: float  # per step, the backbone's own included
    step_ms: float
    tokens_per_s: float


def accepted_length(parents: np.ndarray, tokens: np.ndarray, continuation: list[int]) -> int:
    """Tokens greedy verification accepts from a tree (node 0 the root, each node after its
    parent): the depth of the deepest node whose path from the root spells ``continuation``."""
    depth = np.zeros(len(tokens), dtype=np.int64)
    matches = np.zeros(len(tokens), dtype=bool)
    matches[0] = True
    for node in range(1, len(tokens)):
        parent = int(parents[node])
        depth[node] = depth[parent] + 1
        matches[node] = (matches[parent] and depth[node] <= len(continuation)
                         and int(tokens[node]) == continuation[depth[node] - 1])
    return int(depth[matches].max())


def candidate_shapes(max_topk: int, chains_only: bool) -> list[tuple[int, int, int]]:
    """(depth, beam, topk) to simulate: chains of 1..MAX_DEPTH tokens; unless ``chains_only``,
    the root's top-k alone, and deeper trees expanding up to ``topk`` children of up to
    ``beam`` <= topk nodes per depth."""
    shapes = [(d, 1, 1) for d in range(1, MAX_DEPTH + 1)]
    if chains_only:
        return shapes
    shapes += [(1, 1, k) for k in range(2, max_topk + 1)]
    shapes += [(d, b, k) for d in range(2, MAX_DEPTH + 1) for k in range(2, min(3, max_topk) + 1)
               for b in range(1, k + 1)]
    return shapes


def _tree_size(depth: int, beam: int, topk: int) -> int:
    return topk + (depth - 1) * beam * topk


@dataclass
class _Prompt:
    ids: list[int]
    continuation: list[int]  # the backbone's greedy tokens after the prompt
    features: np.ndarray  # [len(ids) + len(continuation) - 1, H], position by position


def _prepare(engine, prompt: str, new_tokens: int) -> _Prompt | None:
    """The backbone's greedy continuation of ``prompt`` and its features, as decoding
    computes them (``eval_draft.greedy_with_features``); None without room or continuation."""
    ids = engine.encode(prompt)
    if len(ids) + MAX_DEPTH + 2 > engine.capacity:
        return None
    continuation, features = greedy_with_features(engine, ids, new_tokens)
    if len(continuation) < 2:
        return None
    return _Prompt(ids, continuation, features)


def simulate(engine, prompt: _Prompt, shape: tuple[int, int, int], chain: bool,
             budgets: range) -> tuple[dict[int, list[int]], list[float]]:
    """Accepted lengths per budget at every position of ``prompt``'s continuation, and the
    drafting times (ms)."""
    depth, beam, topk = shape
    params = DraftTreeParams(depth=depth, beam=beam, topk=topk, budget=max(budgets))
    state = DraftState(engine.backend, depth)
    p, y = len(prompt.ids), prompt.continuation
    state.start(prompt.ids, y[0], prompt.features[:p])
    accepted: dict[int, list[int]] = {b: [] for b in budgets}
    times = []
    for t in range(len(y) - 1):
        t0 = time.perf_counter()
        if chain:
            drafted = state.propose()
            parents = np.arange(-1, len(drafted), dtype=np.int64)
            tokens = np.array([y[t], *drafted], dtype=np.int64)
            trees = {b: (parents[:b + 1], tokens[:b + 1]) for b in budgets}
        else:
            grown = state.propose_tree(params)
            trees = {} if grown is None else _budgets(state, budgets)
        times.append((time.perf_counter() - t0) * 1e3)
        if not trees:
            break
        for budget, (parents, tokens) in trees.items():
            accepted[budget].append(accepted_length(parents, tokens, y[t + 1:]))
        state.accept([y[t + 1]], prompt.features[p + t:p + t + 1])
    return accepted, times


def _budgets(state: DraftState, budgets: range) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    tree: DraftTree = state.last_tree
    return {b: tree.select(b) for b in budgets}


def fit_latency(measured: dict[int, float], sizes: range) -> dict[int, float]:
    """The least-squares line through the measured forward times, at ``sizes``."""
    q = np.array(sorted(measured), dtype=np.float64)
    slope, intercept = np.polyfit(q, [measured[int(s)] for s in q], 1)
    return {s: float(intercept + slope * s) for s in sizes}


def choose_draft_tree(stats: dict[tuple, dict], latency: dict[int, float]
                      ) -> tuple[DraftTreeChoice, list[DraftTreeChoice]]:
    """The fastest (shape, budget) of the simulated ``stats`` (shape -> {"accepted":
    {budget: lengths}, "draft_ms": median}) under the measured forward ``latency``."""
    curve = []
    for (depth, beam, topk), row in stats.items():
        for budget, lengths in row["accepted"].items():
            if not lengths:
                continue
            expected = 1.0 + float(np.mean(lengths))
            step = interpolate(latency, budget + 1) + row["draft_ms"]
            curve.append(DraftTreeChoice(DraftTreeParams(depth, beam, topk, budget), expected,
                                         step, 1e3 * expected / step))
    return max(curve, key=lambda c: c.tokens_per_s), curve


def tune_draft_tree(engine, prompts: list[str] | None = None, max_nodes: int = 12,
                    new_tokens: int = 64, write: bool = True,
                    progress: Callable[[int], None] = lambda n: None) -> dict:
    """Simulate, choose, and (``write``) store the draft tree in the manifest's ``draft``
    section (``draft.tree``; the engine reads it at load)."""
    if not engine.has_draft:
        raise ValueError("this artifact has no draft layer to tune")
    prompts = prompts if prompts is not None else heldout_prompts()
    chains_only = engine.verifies_chains
    prepared = []
    for prompt in prompts:
        item = _prepare(engine, prompt, new_tokens)
        if item is not None:
            prepared.append(item)
        progress(1)
    shapes = [s for s in candidate_shapes(int(engine.manifest.draft["topk"]), chains_only)
              if not chains_only or s[0] <= max_nodes]
    stats = {}
    for shape in shapes:
        size = shape[0] if chains_only else min(_tree_size(*shape), max_nodes)
        budgets = range(size, size + 1) if chains_only else range(1, size + 1)
        accepted: dict[int, list[int]] = {b: [] for b in budgets}
        times: list[float] = []
        for item in prepared:
            lengths, ms = simulate(engine, item, shape, chains_only, budgets)
            for budget in budgets:
                accepted[budget] += lengths[budget]
            times += ms
        stats[shape] = {"accepted": accepted, "draft_ms": statistics.median(times)}
    sizes = sorted({1, 2, 3, 5, 7, 9, max_nodes + 1})
    measured = measure_forward_ms(engine, [s for s in sizes if s <= max_nodes + 1], repeats=15)
    # chains: 2..5 rows, each measured (at int8 activations two rows cost one: not a line)
    latency = ({q: interpolate(measured, q) for q in range(1, max_nodes + 2)} if chains_only
               else fit_latency(measured, range(1, max_nodes + 2)))
    best, curve = choose_draft_tree(stats, latency)
    record = {
        **asdict(best.params),
        "tuned_for": {
            **tuned_summary(engine, best.expected_tokens, best.step_ms, best.tokens_per_s,
                            measured),
            "chains_only": chains_only,
            **({} if chains_only else {"forward_ms_fit": [round(latency[1], 3),
                                                          round(latency[2] - latency[1], 3)]}),
            "prompts": len(prepared), "new_tokens": new_tokens,
        },
    }
    if write:
        draft = dict(engine.manifest.draft)
        draft["tree"] = record
        update_manifest(engine.path, {"draft": draft})
        engine.set_draft_tree(best.params)
    record["curve"] = [{**asdict(c.params), "expected_tokens": round(c.expected_tokens, 3),
                        "step_ms": round(c.step_ms, 2),
                        "tokens_per_s": round(c.tokens_per_s, 2)} for c in curve]
    return record
