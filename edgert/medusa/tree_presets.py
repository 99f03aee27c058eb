"""Named Medusa trees shipped with edgert, and reading a tree from a file.

The shipped trees are built with the Medusa paper's greedy construction
(``tree.greedy_tree``) from nominal per-rank head accuracies (the paper's 7B top-1 figures with
a geometric fall-off over ranks). ``edgert tune-tree`` replaces them with a tree built from the
artifact's own measured head accuracies and this machine's verification latencies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgert.errors import ConfigError
from edgert.medusa.tree_buffers import chain_tree, greedy_tree

NOMINAL_TOP1 = (0.56, 0.32, 0.20, 0.15, 0.12)  # Medusa paper, 7B heads 0..4
NOMINAL_RANK_DECAY = 0.35  # share of the remaining mass each next rank catches


def nominal_rank_accuracy(num_heads: int, topk: int) -> np.ndarray:
    acc = np.zeros((num_heads, topk))
    for i in range(num_heads):
        top1 = NOMINAL_TOP1[min(i, len(NOMINAL_TOP1) - 1)]
        acc[i, 0] = top1
        rest = 1.0 - top1
        for r in range(1, topk):
            acc[i, r] = rest * NOMINAL_RANK_DECAY * (1 - NOMINAL_RANK_DECAY) ** (r - 1) * top1
    return acc


TREE_SIZES = {"cpu": 24, "gpu": 64}


def named_tree(name: str, num_heads: int, topk: int) -> list[list[int]]:
    """``chain`` (top-1 of every head), ``cpu`` (24 nodes), ``gpu`` (64 nodes)."""
    if name == "chain":
        return chain_tree(num_heads)
    if name in TREE_SIZES:
        return greedy_tree(nominal_rank_accuracy(num_heads, topk), TREE_SIZES[name])
    raise ConfigError(f"unknown tree '{name}'; shipped trees: chain, "
                      f"{', '.join(TREE_SIZES)}, or pass a JSON file")


def read_tree_file(path: Path) -> list[list[int]]:
    """A JSON list of paths, or an object with a ``choices`` list."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read tree file {path} ({exc}); it must be JSON: a list of "
                          "paths like [[0], [1], [0, 0]]") from None
    choices = data.get("choices") if isinstance(data, dict) else data
    if not isinstance(choices, list):
        raise ConfigError(f"tree file {path} has no list of paths")
    return choices


def resolve_tree(spec: str | Path, num_heads: int, topk: int) -> tuple[str, list[list[int]]]:
    """A tree from a name or a file; returns (name, choices)."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        return path.stem, read_tree_file(path)
    return str(spec), named_tree(str(spec), num_heads, topk)
