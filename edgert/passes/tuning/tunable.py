"""The tunable kernels, each described once: read by the compile pipeline and by the tuner.

A :class:`TunableKernel` names its knobs class and untuned default, how a workload is keyed in
the tuning database (the kernel's shape), and the workloads ``edgert tune`` measures for a
model. The pipeline asks it for the knobs of a shape (the database's best, else the default);
the tuner for its workloads. A workload knows how to build the kernel for a knob setting, the
search space (the untuned default first), and the inputs of its measurement (representative
shapes: a decode step and a Medusa tree at a mid-size context). The objective is the summed
latency over those shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact.manifest import GraphKey
from edgert.dhsa.params import DHSAParams
from edgert.errors import EdgertError
from edgert.medusa.tree_order import causal_order, tree_order_from_parents
from edgert.model.config import DecoderConfig
from edgert.passes.fuse_parallel_matmuls import decoder_matmul_shapes
from edgert.passes.tir.dhsa_attention import DEFAULT_KNOBS as DHSA_DEFAULT
from edgert.passes.tir.dhsa_attention import (
    DHSAKnobs,
    dhsa_attention_tir,
    dhsa_search_space,
    dhsa_workload,
)
from edgert.passes.tir.matmul import (
    DEFAULT as MATMUL_DEFAULT,
)
from edgert.passes.tir.matmul import (
    SEARCH_SPACE as MATMUL_SPACE,
)
from edgert.passes.tir.matmul import (
    MatmulKnobs,
    matmul_workload,
    pack_weight,
    packed_matmul_tir,
)
from edgert.passes.tir.quant_matmul import DEFAULT as QUANT_DEFAULT
from edgert.passes.tir.quant_matmul import SEARCH_SPACE as QUANT_SPACE
from edgert.passes.tir.quant_matmul import (
    QuantizedWeight,
    pack_quantized,
    quant_matmul_tir,
    quant_matmul_workload,
)
from edgert.passes.tir.tree_attention import DEFAULT_KNOBS as TREE_DEFAULT
from edgert.passes.tir.tree_attention import (
    TreeAttentionKnobs,
    tree_attention_search_space,
    tree_attention_tir,
    tree_attention_workload,
)
from edgert.passes.tuning.database import TuningDatabase

MEDUSA_TREE = np.array([-1, 0, 0, 1, 1, 2, 3, 4])  # an 8-node tree for the shapes measured


@dataclass
class Workload:
    """One kernel instance to tune."""

    name: str
    kernel: str
    build: Callable[[Any], Any]  # knobs -> PrimFunc (global_symbol set)
    space: list  # knob settings, the untuned default first
    inputs: Callable[[np.random.Generator], list[list]]  # rng -> argument lists, one per shape
    shapes: str  # the measured shapes, in words
    # per-knob transform of the inputs (e.g. the weight packed for the panel width)
    prepare: Callable[[Any, list], list] = lambda knobs, args: args
    max_runs: int | None = None  # cap on timed runs per shape (slow kernels)

    def knobs_dict(self, knobs) -> dict:
        return dataclasses.asdict(knobs)

    def knobs_from(self, data: dict):
        return type(self.space[0])(**data)


@dataclass(frozen=True)
class TuneScope:
    """What decides an artifact's workloads: the model, the KV capacity, DHSA, and the bits of
    each block-quantized weight group (``manifest.quantization``; empty: fp32 weights)."""

    config: DecoderConfig
    context: int
    dhsa: DHSAParams | None = None
    bits: dict[str, int] = dataclasses.field(default_factory=dict)
    # (K, N, bits) of the draft layer's weight matmuls (its graph's own shapes and formats)
    draft_shapes: frozenset = frozenset()

    @classmethod
    def from_manifest(cls, manifest, artifact: Path | None = None) -> TuneScope:
        """The scope of an artifact's manifest; with ``artifact`` (its directory) the draft
        layer's matmuls too, read from its portable graph."""
        scope = cls._from_manifest(manifest)
        spec = manifest.graphs.get(GraphKey.DRAFT_PORTABLE)
        if artifact is None or spec is None:
            return scope
        return dataclasses.replace(scope, draft_shapes=frozenset(
            graph_weight_shapes(Path(artifact) / spec.file)))

    @classmethod
    def _from_manifest(cls, manifest) -> TuneScope:
        quantization = manifest.quantization or {}
        # at --compute fp32 an 8-bit weight is expanded to fp32 in the graph (ONNX Runtime has
        # no fp32-compute kernel for it): TVM sees an fp32 matmul
        expanded = quantization.get("compute") == "fp32"
        bits = {name: int(group["bits"]) for name, group in quantization.get("groups", {}).items()
                if not (expanded and int(group["bits"]) == 8)}
        return cls(manifest.config, manifest.kv_cache.capacity, DHSAParams.from_manifest(manifest),
                   bits)

    def weight_shapes(self) -> set[tuple[int, int, int | None]]:
        """(K, N, bits) of every weight matmul after FuseParallelMatmuls
        (``decoder_matmul_shapes``: q/k/v, o, gate/up, down, vocab) and of the Medusa heads'
        blocks (H, H); bits None for fp32. The heads of a quantized artifact are quantized
        (``medusa_heads``: 8-bit, fp32 at --compute fp32; tuned whether the artifact has
        heads or not); and the draft layer's, as its graph has them (``draft_shapes``)."""
        qkv, o, gate_up, down, vocab = decoder_matmul_shapes(self.config)
        h = self.config.hidden_size
        groups = [(qkv, "q_proj"), (o, "o_proj"), (gate_up, "gate_proj"), (down, "down_proj"),
                  (vocab, "vocab")]
        groups.append(((h, h), "medusa_heads"))
        return {(k, n, self.bits.get(group)) for (k, n), group in groups} | set(
            self.draft_shapes)


def graph_weight_shapes(path: Path) -> set[tuple[int, int, int | None]]:
    """(K, N, bits) of an ONNX graph's weight matmuls, as TVM will see them:
    MatMulNBits (its K, N and bits) and MatMul against an initializer [K, N] (bits None).
    Read without the weights."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name: tuple(init.dims) for init in graph.initializer}
    shapes = set()
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            shapes.add((int(attrs["K"]), int(attrs["N"]), int(attrs["bits"])))
        elif node.op_type == "MatMul" and len(initializers.get(node.input[1], ())) == 2:
            k, n = initializers[node.input[1]]
            shapes.add((int(k), int(n), None))
    return shapes


def _named(func, name: str):
    return func.with_attr("global_symbol", name)


def matmul_workloads(scope: TuneScope) -> list[Workload]:
    """The fp32 weight matmuls: the decoder's as FuseParallelMatmuls leaves them, and the
    Medusa heads' hidden -> hidden blocks."""
    return [_matmul(k, n) for k, n, bits in sorted(scope.weight_shapes(), key=str)
            if bits is None]


def _matmul(k: int, n: int) -> Workload:
    rows = (1, 2)  # a decode step, the CPU's tuned Medusa tree (2 nodes)

    def inputs(rng):
        weight = rng.standard_normal((k, n)).astype(np.float32)
        return [[rng.standard_normal((1, m, k)).astype(np.float32), weight,
                 np.zeros((1, m, n), np.float32)] for m in rows]

    def build(knobs: MatmulKnobs):
        return _named(packed_matmul_tir(k, n, knobs), "kernel")

    def prepare(knobs: MatmulKnobs, args: list) -> list:
        return [args[0], pack_weight(args[1], knobs.bn), args[2]]

    space = [MATMUL_DEFAULT] + [kn for kn in MATMUL_SPACE if kn != MATMUL_DEFAULT and kn.fits(n)]
    return Workload(matmul_workload(k, n), "matmul", build, space, inputs,
                    f"x [1,m,{k}] @ W [{k},{n}], m = {', '.join(map(str, rows))}", prepare)


def quant_matmul_workloads(scope: TuneScope) -> list[Workload]:
    """The block-quantized weight matmuls, each at its group's bits."""
    return [_quant_matmul(k, n, bits) for k, n, bits in sorted(scope.weight_shapes(), key=str)
            if bits is not None]


def _quant_matmul(k: int, n: int, bits: int, block: int = 32) -> Workload:
    rows = (1, 2)  # a decode step, the CPU's tuned Medusa tree (2 nodes)

    def inputs(rng):
        words = rng.integers(-2 ** 31, 2 ** 31, (n, k * bits // 32), dtype=np.int64)
        weight = QuantizedWeight(bits, block, words.astype(np.int32),
                                 rng.random((n, k // block), dtype=np.float32),
                                 -rng.random((n, k // block), dtype=np.float32))
        return [[rng.standard_normal((1, m, k)).astype(np.float32), weight,
                 np.zeros((1, m, n), np.float32)] for m in rows]

    def build(knobs: MatmulKnobs):
        return _named(quant_matmul_tir(k, n, bits, block, knobs), "kernel")

    def prepare(knobs: MatmulKnobs, args: list) -> list:
        return [args[0], *pack_quantized(args[1], knobs.bn), args[2]]

    space = [QUANT_DEFAULT] + [kn for kn in QUANT_SPACE if kn != QUANT_DEFAULT and kn.fits(n)]
    return Workload(quant_matmul_workload(k, n, bits), "quant_matmul", build, space, inputs,
                    f"x [1,m,{k}] @ W [{k},{n}] {bits}-bit, m = {', '.join(map(str, rows))}",
                    prepare)


def tree_attention_workloads(scope: TuneScope) -> list[Workload]:
    config = scope.config
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    past = min(scope.context, 2048) - len(MEDUSA_TREE)
    orders = [causal_order(1), tree_order_from_parents(MEDUSA_TREE)]

    def inputs(rng):
        cache = [rng.standard_normal((hkv, past + len(MEDUSA_TREE), d)).astype(np.float32)
                 for _ in range(2)]
        return [[rng.standard_normal((len(o), hq, d)).astype(np.float32), *cache, o, past,
                 np.zeros((len(o), hq, d), np.float32)] for o in orders]

    def build(knobs: TreeAttentionKnobs):
        return _named(tree_attention_tir(hq, hkv, d, knobs=knobs), "kernel")

    space = [TREE_DEFAULT] + [k for k in tree_attention_search_space(hq, hkv, d)
                              if k != TREE_DEFAULT]
    return [Workload(tree_attention_workload(hq, hkv, d), "tree_attention", build, space,
                     inputs, f"decode step and an {len(MEDUSA_TREE)}-node tree over "
                             f"{past} cached tokens")]


def dhsa_workloads(scope: TuneScope) -> list[Workload]:
    """The fused DHSA kernel (the artifact's parameters) on a prompt just above its
    threshold; none when the artifact has no DHSA."""
    params, config = scope.dhsa, scope.config
    if params is None:
        return []
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    seq = min(scope.context, params.min_context + params.block_size * 4)

    def inputs(rng):
        starts = (rng.random(seq) < 1 / 48).astype(np.int32)  # chunks of ~48 tokens
        starts[0] = 1
        return [[rng.standard_normal((seq, hq, d)).astype(np.float32),
                 rng.standard_normal((seq, hkv, d)).astype(np.float32),
                 rng.standard_normal((seq, hkv, d)).astype(np.float32), starts,
                 np.zeros((seq, hq, d), np.float32)]]

    def build(knobs: DHSAKnobs):
        return _named(dhsa_attention_tir(hq, hkv, d, params, knobs=knobs), "kernel")

    space = [DHSA_DEFAULT] + [k for k in dhsa_search_space(hq, hkv) if k != DHSA_DEFAULT]
    return [Workload(dhsa_workload(hq, hkv, d), "dhsa_attention", build, space, inputs,
                     f"a {seq}-token prompt, the artifact's DHSA parameters, ~48-token chunks",
                     max_runs=5)]


@dataclass(frozen=True)
class TunableKernel:
    """One tunable kernel: its knobs, its database key, its workloads for a model."""

    name: str
    knobs: type  # the knobs dataclass
    default: Any  # the untuned knobs
    workload_key: Callable[..., str]  # the kernel's shape -> its name in the tuning database
    workloads: Callable[[TuneScope], list[Workload]]  # the workloads to measure

    def knobs_for(self, tuning: TuningDatabase, *shape) -> Any:
        """The database's best knobs for this shape, else the untuned default."""
        best = tuning.best(self.workload_key(*shape))
        return self.knobs(**best.knobs) if best else self.default


TUNABLE: dict[str, TunableKernel] = {
    "tree_attention": TunableKernel("tree_attention", TreeAttentionKnobs, TREE_DEFAULT,
                                    tree_attention_workload, tree_attention_workloads),
    "dhsa_attention": TunableKernel("dhsa_attention", DHSAKnobs, DHSA_DEFAULT, dhsa_workload,
                                    dhsa_workloads),
    "matmul": TunableKernel("matmul", MatmulKnobs, MATMUL_DEFAULT, matmul_workload,
                            matmul_workloads),
    "quant_matmul": TunableKernel("quant_matmul", MatmulKnobs, QUANT_DEFAULT,
                                  quant_matmul_workload, quant_matmul_workloads),
}


def get_tunable(name: str) -> TunableKernel:
    if name not in TUNABLE:
        raise EdgertError(f"unknown kernel '{name}'; tunable: {', '.join(TUNABLE)}")
    return TUNABLE[name]


def workloads_for(scope: TuneScope, kernels: list[str] | None = None) -> list[Workload]:
    chosen = kernels or list(TUNABLE)
    unknown = [k for k in chosen if k not in TUNABLE]
    if unknown:
        raise EdgertError(f"unknown kernel(s) {', '.join(unknown)}; tunable: "
                          f"{', '.join(TUNABLE)}")
    return [w for k in chosen for w in TUNABLE[k].workloads(scope)]
