"""``edgert tune-tree``: the best Medusa tree for this artifact on this machine.

speed(tree) ~ expected tokens per step / time per step, where
- expected tokens per step = 1 + sum over the tree's paths of the product of the heads'
  measured per-rank accuracies (the Medusa paper's greedy construction, ``greedy_tree``), and
- time per step = the measured verification forward for q = nodes + 1 tokens (interpolated
  between measured sizes) + the heads call.
The best size on a 2-core CPU (where a 32-token forward costs 2.5x a 1-token one) is not the
best on a GPU (nearly flat up to 64), so the manifest records the device it was tuned for.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgert.artifact.io import update_manifest
from edgert.medusa.tree_buffers import build_tree_buffers, expected_accept_length, greedy_tree
from edgert.train.eval_heads import evaluate_heads
from edgert.train.prompts import heldout_prompts

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class TreeChoice:
    nodes: int
    expected_tokens: float
    step_ms: float
    tokens_per_s: float


def measure_forward_ms(engine, sizes=DEFAULT_SIZES, prefix: int = 200,
                       repeats: int = 7) -> dict[int, float]:
    """Median time of one forward of q tokens after ``prefix`` cached tokens."""
    rng = np.random.default_rng(0)
    vocab = engine.manifest.config.vocab_size
    engine.reset()
    engine.prefill_ids(rng.integers(0, vocab, prefix).tolist())
    out = {}
    for q in sizes:
        ids = rng.integers(0, vocab, q)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.forward_uncommitted(ids)
            times.append(time.perf_counter() - t0)
        out[q] = statistics.median(times) * 1e3
    return out


def measure_heads_ms(engine, repeats: int = 15) -> float:
    hidden = np.zeros((1, engine.manifest.config.hidden_size), dtype=np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.head_candidates(hidden, np.zeros(1, dtype=np.int64))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interpolate(latency: dict[int, float], q: int) -> float:
    sizes = sorted(latency)
    return float(np.interp(q, sizes, [latency[s] for s in sizes]))


def choose_tree(rank_accuracy: np.ndarray, latency: dict[int, float], heads_ms: float,
                max_nodes: int) -> tuple[TreeChoice, list[TreeChoice]]:
    """Evaluate every tree size 1..max_nodes; return the fastest and the whole curve."""
    curve = []
    for n in range(1, max_nodes + 1):
        choices = greedy_tree(rank_accuracy, n)
        expected = expected_accept_length(rank_accuracy, choices)
        step = interpolate(latency, n + 1) + heads_ms
        curve.append(TreeChoice(n, expected, step, 1e3 * expected / step))
    return max(curve, key=lambda c: c.tokens_per_s), curve


def tuned_summary(engine, expected_tokens: float, step_ms: float, tokens_per_s: float,
                  forward_ms: dict[int, float]) -> dict:
    """What a tuned tree was tuned for and predicted (the manifest's ``tuned_for``): this
    machine, the chosen tree's tokens per step and step time, and the measured forwards."""
    return {**device_description(engine),
            "expected_tokens_per_step": round(expected_tokens, 3),
            "step_ms": round(step_ms, 2),
            "plain_step_ms": round(forward_ms[1], 2),
            "predicted_tokens_per_s": round(tokens_per_s, 2),
            "plain_tokens_per_s": round(1e3 / forward_ms[1], 2),
            "forward_ms_by_q": {str(q): round(v, 2) for q, v in forward_ms.items()}}


def device_description(engine) -> dict:
    return {"device": engine.device, "backend": engine.backend_name,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}


def tune_tree(engine, prompts: list[str] | None = None, max_nodes: int = 64,
              max_new_tokens: int = 96, write: bool = True,
              progress: Callable[[int], None] = lambda n: None) -> dict:
    """Measure, choose, and (``write``) store the tree in the artifact's manifest."""
    prompts = prompts if prompts is not None else heldout_prompts()
    accuracy = evaluate_heads(engine, prompts, max_new_tokens, progress)
    rank_accuracy = np.asarray(accuracy.rank_accuracy)
    sizes = tuple(s for s in DEFAULT_SIZES if s <= max_nodes + 1) + (max_nodes + 1,)
    latency = measure_forward_ms(engine, sorted(set(sizes)))
    heads_ms = measure_heads_ms(engine)
    best, curve = choose_tree(rank_accuracy, latency, heads_ms, max_nodes)
    choices = greedy_tree(rank_accuracy, best.nodes)
    tree = build_tree_buffers(choices, engine.manifest.medusa["topk"],
                              engine.manifest.medusa["num_heads"])
    record = {
        "name": f"tuned-{best.nodes}",
        "choices": [list(p) for p in tree.paths],
        "nodes": best.nodes,
        "tuned_for": {
            **tuned_summary(engine, best.expected_tokens, best.step_ms, best.tokens_per_s,
                            latency),
            "heads_ms": round(heads_ms, 2),
            "rank_accuracy": accuracy.rank_accuracy,
            "top1": accuracy.top1,
        },
    }
    if write:
        update_manifest(engine.path, {"tree": record})
        engine.set_tree(record["choices"])
    record["curve"] = [c.__dict__ for c in curve]
    return record
