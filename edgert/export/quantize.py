"""Quantized weights in the exported graphs: MatMul -> com.microsoft MatMulNBits, in place.

Export traces every graph in fp32, then rewrites each weight matmul whose weight has a block
form (``edgert.model.block_quant``) and the token embedding that reads the same tensor::

    y = MatMul(x, W.T)          ->   y = MatMulNBits(x, W.q, W.scales)            symmetric
                                     y = MatMulNBits(x, W.q, W.scales, W.zero_points)
                                                                     integer zero points (rtn4)
                                     y = MatMulNBits(x, W.q, W.scales)         minimum (Q4_1),
                                         + MatMul(blocksum(x), W.correction)   fp32 compute
                                     y = MatMulNBits(Concat(x, blocksum(x)),   minimum (Q4_1),
                                             W.q, W.scales, W.zero_points)     int8 compute
        blocksum(x) = ReduceSum(Reshape(x, [0, 0, K/32, 32]), -1)    [.., K/32], one per x

    emb = Gather(lm_head_t, ids, axis=1)   ->   emb = Transpose((Cast(Gather(W.q, ids)) - zero)
                                                       * Gather(W.scales, ids)[.., None])
                                                 (the tied embedding: the same W.q and scales
                                                  as the lm_head's MatMulNBits, no fp32 copy)

MatMulNBits computes ``scale * (q - zero)`` with its default zero point (8 for 4 bits, 128
for 8 bits); an asymmetric block's minimum comes back through the correction, a [K/32, N]
fp32 matmul (1/32 of the weight's size), so GGUF's Q4_1 runs exactly, with no float zero
points (which take MLAS's slow dequantize-every-call path). At int8 compute the correction's
four nodes per weight group cost 18% of a SmolLM2 decode step, so there the minimum runs as
minimum rows instead (``edgert.model.block_quant.MinimumRows``): integer zero points take the
minimum's whole steps, and its remainder, rounded to 4 bits, rides in K/32 extra rows of the
same MatMulNBits that multiply the block sums appended to its input. The blocks themselves stay
as stored; each block's minimum moves by that rounding (the manifest's ``minimum_rows``
error). The vocabulary keeps the exact form (the embedding reads its blocks).
``accuracy_level`` is the ``--compute`` mode: 1 computes in fp32 (output = the dequantized
model up to summation order), 4 quantizes the activations to int8 per block (VNNI). ONNX
Runtime has no fp32 kernel for 8-bit weights, so at ``--compute fp32`` an 8-bit weight is
expanded to fp32 when the session loads (constant-folded; the file stays 8-bit).

The new initializers are named after the HF weight (``model.layers.3.self_attn.q_proj.weight.q``
...), so every graph of the artifact refers to one copy in ``model.onnx.data``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgert.errors import ConfigError
from edgert.model.block_quant import (
    BLOCK,
    MINIMUM_ROWS_BITS,
    BlockQuantized,
    minimum_as_rows,
    quantization_error,
    quantize_rtn,
)
from edgert.model.config import DecoderConfig
from edgert.model.loaded import LoadedModel

WEIGHT_FORMATS = ("auto", "q4", "q8", "fp32")
COMPUTE_MODES = {"fp32": 1, "int8": 4}  # --compute -> MatMulNBits accuracy_level
MS_DOMAIN = "com.microsoft"
# the Medusa heads' output-vocab projection (lm_head columns) and its token ids
# (edgert.export.medusa_graph)
SELECTED_VOCAB, SELECTED_VOCAB_IDS = "medusa_proj_t", "heads.vocab_ids"
# projection initializer -> its token ids: lm_head's columns a graph reads (the Medusa heads',
# the draft layer's), gathered from lm_head's own blocks when the session loads
VOCAB_SELECTIONS = {SELECTED_VOCAB: SELECTED_VOCAB_IDS, "draft_proj_t": "draft.vocab_ids"}
_LAYER_WEIGHT = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.MatMul\.B$")
# GGUF storage types without an exact block form: requantized to this many bits
_REQUANTIZE_BITS = {"Q2_K": 4, "Q3_K": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "Q5_0": 8,
                    "Q5_1": 8, "Q5_K": 8, "Q6_K": 8, "Q8_1": 8, "Q8_K": 8}


@dataclass(frozen=True)
class WeightOptions:
    """``--weights``: auto keeps the source's precision (GGUF blocks as stored; HF float
    weights as fp32), q4/q8 quantize every linear weight to 4/8-bit blocks (the embedding
    and lm_head to 8 bits at q4), fp32 dequantizes everything. ``--compute``: fp32 or int8
    activations in the quantized matmuls."""

    weights: str = "auto"
    compute: str = "int8"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ConfigError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got "
                              f"{self.weights!r}")
        if self.compute not in COMPUTE_MODES:
            raise ConfigError(f"--compute must be one of {', '.join(COMPUTE_MODES)}, got "
                              f"{self.compute!r}")

    @property
    def accuracy_level(self) -> int:
        return COMPUTE_MODES[self.compute]


def hf_weight_name(initializer: str, config: DecoderConfig) -> str | None:
    """The transformers weight an exported initializer is (its transpose), or None."""
    if initializer == "lm_head_t":
        return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    match = _LAYER_WEIGHT.match(initializer)
    if match:
        layer, block, proj = match.groups()
        return f"model.layers.{layer}.{block}.{proj}.weight"
    return None


def _is_vocab_weight(name: str) -> bool:
    return name in ("model.embed_tokens.weight", "lm_head.weight")


def _runs_as_minimum_rows(name: str, w: BlockQuantized, accuracy_level: int) -> bool:
    """Whether ``w`` runs as minimum rows (edgert.model.block_quant.MinimumRows): a 4-bit
    minimum form (Q4_1) at int8 activations, not the vocabulary (the embedding reads its exact
    blocks). At fp32 compute the minimum stays exact (the correction matmul)."""
    return (w.minimum is not None and w.bits == MINIMUM_ROWS_BITS
            and accuracy_level == COMPUTE_MODES["int8"] and not _is_vocab_weight(name))


def plan_quantization(loaded: LoadedModel, options: WeightOptions
                      ) -> tuple[dict[str, BlockQuantized], dict[str, dict]]:
    """The block form of every weight matrix ``options`` quantizes (HF name -> blocks), and
    per weight what happened: format, bits, and the error against the source's own fp32
    values where it was requantized (zero where the blocks are the source's)."""
    chosen: dict[str, BlockQuantized] = {}
    report: dict[str, dict] = {}
    if options.weights == "fp32":
        return chosen, report
    for name, tensor in loaded.state_dict.items():
        if tensor.dim() != 2 or tensor.shape[1] % BLOCK or "norm" in name:
            continue
        source_type = loaded.source_types.get(name, "F32")
        exact = loaded.quantized.get(name)
        bits = _target_bits(name, source_type, exact, options.weights)
        if bits is None:
            continue
        if exact is not None and exact.bits == bits and _keeps(exact, name, options.weights):
            chosen[name] = exact
            report[name] = {"format": exact.source, "bits": bits, "requantized": False}
            if _runs_as_minimum_rows(name, exact, options.accuracy_level):
                report[name]["minimum_rows"] = minimum_as_rows(exact).error()
            continue
        weight = tensor.numpy()
        quantized = quantize_rtn(weight, bits)
        chosen[name] = quantized
        report[name] = {"format": quantized.source, "bits": bits, "requantized": True,
                        "from": source_type, **quantization_error(weight, quantized)}
    return chosen, report


def _keeps(exact: BlockQuantized, name: str, weights: str) -> bool:
    """Whether the source's own blocks serve as they are: always at ``auto``; at ``q4`` only
    in a form MatMulNBits runs with no correction (symmetric or integer zero point: Q4_0),
    or for the vocabulary (the embedding reads it too)."""
    return weights != "q4" or exact.form != "minimum" or _is_vocab_weight(name)


def _target_bits(name: str, source_type: str, exact: BlockQuantized | None,
                 weights: str) -> int | None:
    """Bits a weight is stored with under ``--weights`` (None: stays fp32)."""
    if weights == "q8":
        return 8
    if weights == "q4":
        return 8 if _is_vocab_weight(name) and (exact is None or exact.bits != 4) else 4
    # auto: the source's own precision
    if exact is not None:
        return exact.bits
    return _REQUANTIZE_BITS.get(source_type)


def summarize(report: dict[str, dict], options: WeightOptions) -> dict | None:
    """The manifest's ``quantization`` section: per tensor group, format and error."""
    if not report:
        return None
    groups: dict[str, dict] = {}
    for name, row in report.items():
        group = ("medusa_heads" if name.startswith(("heads.", "medusa_")) else
                 "draft_layer" if name.startswith(("draft.", "draft_")) else
                 "vocab" if _is_vocab_weight(name) else name.split(".")[-2])
        entry = groups.setdefault(group, {"format": row["format"], "bits": row["bits"],
                                          "tensors": 0, "requantized": row["requantized"],
                                          "max_error": 0.0, "rms_error": 0.0})
        entry["tensors"] += 1
        if "minimum_rows" in row:
            moved = entry.setdefault("minimum_rows", {"bits": MINIMUM_ROWS_BITS,
                                                      "max_error": 0.0, "rms_error": 0.0})
            moved["max_error"] = max(moved["max_error"], row["minimum_rows"]["max"])
            moved["rms_error"] = max(moved["rms_error"], row["minimum_rows"]["rms"])
        if row["requantized"]:
            entry["max_error"] = max(entry["max_error"], row["max"])
            entry["rms_error"] = max(entry["rms_error"], row["rms"])
    return {"weights": options.weights, "compute": options.compute,
            "accuracy_level": options.accuracy_level, "block_size": BLOCK,
            "op": "com.microsoft.MatMulNBits", "groups": groups}


def _module_path(weight: str) -> list[str]:
    """The module a weight belongs to, as its name's parts: "model.layers.0.mlp.up_proj" from
    an HF name (``...up_proj.weight``), "draft.layer.mlp.up_proj" from an exported graph's own
    initializer (``...up_proj.MatMul.B``)."""
    parts = weight.split(".")
    for suffix in (["MatMul", "B"], ["weight"]):
        if parts[-len(suffix):] == suffix:
            return parts[:-len(suffix)]
    return parts


class _GraphQuantizer:
    """Rewrites one graph's weight MatMuls and tied-embedding Gather (see the module doc)."""

    def __init__(self, graph: onnx.GraphProto, blocks: dict[str, BlockQuantized],
                 config: DecoderConfig, accuracy_level: int, own_bits: int | None = None) -> None:
        self.graph = graph
        self.blocks = dict(blocks)
        self.own_bits = own_bits  # quantize this graph's own weights (Medusa heads) too
        self.config = config
        self.accuracy_level = accuracy_level
        self.inits = {init.name: init for init in graph.initializer}
        self.added: dict[str, onnx.TensorProto] = {}
        self.blocksums: dict[str, str] = {}  # x -> its blocksum, shared by its matmuls
        self.widened: dict[str, str] = {}  # x -> Concat(x, blocksum(x)), likewise
        self.constants: dict[str, str] = {}
        self.used: set[str] = set()  # the HF weights this graph now reads quantized
        self.casts: set[str] = set()  # load-time expansions already emitted
        self.own: dict[str, dict] = {}  # this graph's own weights quantized: name -> report

    def run(self) -> int:
        groups = self._parallel_groups()
        fused_away = {id(node) for members in groups.values() for node, _ in members[1:]}
        new_nodes, replaced = [], 0
        for node in self.graph.node:
            if id(node) in fused_away:  # computed by its group's fused matmul
                replaced += 1
                continue
            if id(node) in groups:
                new_nodes += self._fused(groups[id(node)])
                replaced += 1
                continue
            rewritten = self._rewrite(node)
            if rewritten is None:
                new_nodes.append(node)
            else:
                new_nodes += rewritten
                replaced += 1
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        used = {name for node in self.graph.node for name in node.input}
        kept = [init for init in self.graph.initializer if init.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + list(self.added.values()))
        return replaced

    def _parallel_groups(self) -> dict[int, list[tuple[onnx.NodeProto, str]]]:
        """Weight MatMuls that read the same input (a layer's q/k/v, gate/up) and whose
        blocks have one format: first node's id -> [(node, weight name), ...]. Each group
        becomes one MatMulNBits over the weights stacked along N, a Split after it: fewer,
        wider kernels, and one correction matmul where the format has one."""
        by_input: dict[str, list[tuple[onnx.NodeProto, str]]] = {}
        for node in self.graph.node:
            if node.op_type != "MatMul" or len(node.input) != 2:
                continue
            name = hf_weight_name(node.input[1], self.config)
            if (name is None and node.input[1] in self.inits
                    and node.input[1] not in VOCAB_SELECTIONS):
                name = self._own_name(node.input[1])
            if node.input[1] in self.inits and name in self.blocks:
                by_input.setdefault(node.input[0], []).append((node, name))
        groups = {}
        for members in by_input.values():
            weights = [self.blocks[name] for _, name in members]
            formats = {(w.bits, w.form, w.shape[1]) for w in weights}
            expanded = weights[0].bits == 8 and self.accuracy_level == COMPUTE_MODES["fp32"]
            if len(members) > 1 and len(formats) == 1 and not expanded:
                groups[id(members[0][0])] = members
        return groups

    def _fused(self, members: list[tuple[onnx.NodeProto, str]]) -> list[onnx.NodeProto]:
        names = [name for _, name in members]
        self.used.update(name for name in names if name not in self.own)  # the HF weights
        weights = [self.blocks[name] for name in names]
        def stack(field: str):
            values = [getattr(w, field) for w in weights]
            return None if values[0] is None else np.concatenate(values)

        stacked = BlockQuantized(weights[0].bits, stack("q"), stack("scale"), stack("minimum"),
                                 weights[0].source, stack("zero_point"))
        modules = [_module_path(name) for name in names]
        parts = [module[-1] for module in modules]  # q_proj, k_proj, ...
        fused_name = ".".join(modules[0][:-1] + ["_".join(parts), "weight"])
        first = members[0][0]
        prefix = first.name.rsplit("/", 2)[0] + "/" + "_".join(parts)
        out = f"{prefix}/fused_output"
        self.blocks[fused_name] = stacked
        nodes = self._matmul(helper.make_node("MatMul", [first.input[0], ""], [out],
                                              name=prefix), fused_name, stacked)
        sizes = self._constant(np.array([w.shape[0] for w in weights], np.int64),
                               "split_" + "_".join(str(w.shape[0]) for w in weights))
        nodes.append(helper.make_node("Split", [out, sizes], [n.output[0] for n, _ in members],
                                      axis=-1, name=f"{prefix}/Split"))
        return nodes

    def _weight(self, initializer: str, transposed: bool = True
                ) -> tuple[str, BlockQuantized] | None:
        """The block form of the weight an initializer holds (``transposed``: the initializer
        is W.T, a MatMul's B; else W, a Gemm's transB operand)."""
        if initializer not in self.inits:
            return None
        name = hf_weight_name(initializer, self.config)
        if name is None:
            return self._own_weight(initializer, transposed)
        if name not in self.blocks:
            return None
        self.used.add(name)
        return name, self.blocks[name]

    def _own_weight(self, initializer: str, transposed: bool
                    ) -> tuple[str, BlockQuantized] | None:
        """A weight of this graph alone (the Medusa heads' blocks and projection),
        round-to-nearest quantized to ``own_bits`` when asked."""
        if self.own_bits is None:
            return None
        if initializer not in self.blocks:
            tensor = self.inits[initializer]
            if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) != 2:
                return None
            weight = numpy_helper.to_array(tensor)
            weight = weight.T if transposed else weight
            if weight.shape[1] % BLOCK:
                return None
            self.blocks[initializer] = quantize_rtn(weight, self.own_bits)
            self.own[initializer] = {"format": f"rtn{self.own_bits}", "bits": self.own_bits,
                                     "requantized": True, "from": "F32",
                                     **quantization_error(weight, self.blocks[initializer])}
        return initializer, self.blocks[initializer]

    def _own_name(self, initializer: str) -> str | None:
        """A MatMul's own weight, quantized (its blocks' key), to join a parallel group:
        round-to-nearest works per output column, so quantizing the weights one by one and
        stacking them gives the same blocks as quantizing the stack."""
        found = self._own_weight(initializer, transposed=True)
        return found[0] if found else None

    def _vocab_rows(self, initializer: str) -> tuple[str, BlockQuantized, str] | None:
        """(the vocab weight's name, its blocks, the ids initializer) when ``initializer`` is
        the Medusa heads' output-vocab projection, ``medusa_proj_t`` = lm_head_t[:, vocab_ids]:
        it is read from the lm_head's own blocks, with no copy of those rows."""
        ids = VOCAB_SELECTIONS.get(initializer)
        if ids is None or ids not in self.inits:
            return None
        name = hf_weight_name("lm_head_t", self.config)
        if name not in self.blocks:
            return None
        self.used.add(name)
        return name, self.blocks[name], ids

    def _rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if node.op_type == "MatMul" and len(node.input) == 2:
            selected = self._vocab_rows(node.input[1])
            if selected is not None:
                name, w, rows = selected
                return self._matmul(node, name, w, rows=rows)
            found = self._weight(node.input[1])
            if found is not None:
                return self._matmul(node, *found)
        if (node.op_type == "Gemm" and _attr(node, "transB", 0) == 1
                and _attr(node, "transA", 0) == 0 and _attr(node, "alpha", 1.0) == 1.0
                and _attr(node, "beta", 1.0) == 1.0):
            found = self._weight(node.input[1], transposed=False)
            if found is not None:
                bias = node.input[2] if len(node.input) > 2 else None
                return self._matmul(node, *found, bias=bias)
        if (node.op_type == "Gather" and node.input[0] == "lm_head_t"
                and _attr(node, "axis", 0) == 1):
            found = self._weight(node.input[0])
            if found is not None:
                return self._embedding(node, *found)
        return None

    # -- initializers -----------------------------------------------------------------------
    def _add(self, name: str, array: np.ndarray) -> str:
        if name not in self.added:
            self.added[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def _packed(self, name: str, w: BlockQuantized, nodes: list[onnx.NodeProto]
                ) -> tuple[str, str]:
        """B [N, K/32, 32*bits/8] uint8 (4 bits: two values a byte, low nibble first) and
        fp32 scales [N, K/32]: stored fp16 (``.scales``), cast once when the session loads
        (ONNX Runtime folds the Cast into a constant before MatMulNBits packs its weights)."""
        n, k = w.shape
        q = w.q.reshape(n, k // BLOCK, BLOCK)
        if w.bits == 4:
            q = (q[:, :, 0::2] | (q[:, :, 1::2] << np.uint8(4))).astype(np.uint8)
        b = self._add(f"{name}.q", q)
        scales = self._as_float(self._add(f"{name}.scales", w.scale.astype(np.float16)), nodes)
        return b, scales

    def _zero_points(self, name: str, w: BlockQuantized) -> str:
        """uint8 [N, ceil(K/32 * bits / 8)]: 4 bits, two blocks a byte, the even one low."""
        points = w.zero_point
        if w.bits == 4:
            if points.shape[1] % 2:
                points = np.pad(points, ((0, 0), (0, 1)))
            points = (points[:, 0::2] | (points[:, 1::2] << np.uint8(4))).astype(np.uint8)
        return self._add(f"{name}.zero_points", points)

    def _as_float(self, stored: str, nodes: list[onnx.NodeProto]) -> str:
        """The fp32 value of an fp16 initializer (one Cast per graph, shared by its readers)."""
        out = f"{stored}.f32"
        if out not in self.casts:
            nodes.append(helper.make_node("Cast", [stored], [out], to=TensorProto.FLOAT,
                                          name=f"{stored}/Cast"))
            self.casts.add(out)
        return out

    def _correction(self, name: str, w: BlockQuantized, scales: str,
                    nodes: list[onnx.NodeProto]) -> str:
        """[K/32, N] fp32 ``minimum + zero * scale`` (transposed), from the stored fp16
        minimum and the scales; computed once when the session loads (folded)."""
        out = f"{name}.correction"
        if out in self.casts:
            return out
        minimum = self._as_float(self._add(f"{name}.minimum", w.minimum.astype(np.float16)),
                                 nodes)
        zero = self._constant(np.array(w.zero, np.float32), f"zero_{w.bits}")
        nodes += [helper.make_node("Mul", [scales, zero], [f"{out}/zs"], name=f"{out}/Mul"),
                  helper.make_node("Add", [minimum, f"{out}/zs"], [f"{out}/rows"],
                                   name=f"{out}/Add"),
                  helper.make_node("Transpose", [f"{out}/rows"], [out], perm=[1, 0],
                                   name=f"{out}/Transpose")]
        self.casts.add(out)
        return out

    def _constant(self, value: np.ndarray, tag: str) -> str:
        key = f"edgert.const.{tag}"
        if key not in self.constants:
            self.constants[key] = self._add(key, value)
        return self.constants[key]

    # -- rewrites ---------------------------------------------------------------------------
    def _matmul(self, node: onnx.NodeProto, name: str, w: BlockQuantized,
                bias: str | None = None, rows: str | None = None) -> list[onnx.NodeProto]:
        """``out = x @ W.T (+ bias)``; ``rows`` (an int64 initializer): W's rows ``rows``
        only, gathered from W's own initializers (folded once when the session loads)."""
        n, k = w.shape
        if rows is not None:
            n = int(self.inits[rows].dims[0])
        x, out = node.input[0], node.output[0]
        prefix = node.name or out
        if w.bits == 8 and self.accuracy_level == COMPUTE_MODES["fp32"]:
            # no fp32-compute kernel for 8-bit weights in ORT: expand at load (folded once)
            nodes, expanded = self._dequantized_rows(name, w, rows, prefix)
            t = f"{prefix}/weight_t"
            nodes.append(helper.make_node("Transpose", [expanded], [t], perm=[1, 0],
                                          name=f"{prefix}/Transpose"))
            if bias is None:
                return nodes + [helper.make_node("MatMul", [x, t], [out], name=prefix)]
            return nodes + [helper.make_node("Gemm", [x, t, bias], [out], name=prefix)]
        if rows is None and _runs_as_minimum_rows(name, w, self.accuracy_level):
            return self._minimum_rows_matmul(node, name, w, bias)
        nodes: list[onnx.NodeProto] = []
        b, scales = self._packed(name, w, nodes)
        zero_points = self._zero_points(name, w) if w.zero_point is not None else ""
        if rows is not None:
            b, scales = (self._gather(t, rows, 0, nodes) for t in (b, scales))
            zero_points = zero_points and self._gather(zero_points, rows, 0, nodes)
        main = out if w.minimum is None else f"{prefix}/nbits_output"
        nodes.append(self._nbits(x, (b, scales, zero_points), bias, main, prefix, k, n, w.bits))
        if w.minimum is None:
            return nodes
        sums = self._blocksum(x, k, nodes)
        table = self._correction(name, w, self._as_float(f"{name}.scales", nodes), nodes)
        if rows is not None:
            table = self._gather(table, rows, 1, nodes)
        nodes += [helper.make_node("MatMul", [sums, table], [f"{prefix}/correction"],
                                   name=f"{prefix}Correction"),
                  helper.make_node("Add", [main, f"{prefix}/correction"], [out],
                                   name=f"{prefix}AddCorrection")]
        return nodes

    def _nbits(self, x: str, weight: tuple[str, str, str], bias: str | None, out: str,
               prefix: str, k: int, n: int, bits: int) -> onnx.NodeProto:
        """MatMulNBits(x, B, scales, zero points) (+ bias); ``k`` inputs, ``n`` outputs."""
        inputs = [x, *weight, "", bias or ""]  # bias is input 5
        while inputs[-1] == "":  # optional inputs left out at the end
            inputs.pop()
        return helper.make_node("MatMulNBits", inputs, [out], name=f"{prefix}NBits",
                                domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=BLOCK,
                                accuracy_level=self.accuracy_level)

    def _minimum_rows_matmul(self, node: onnx.NodeProto, name: str, w: BlockQuantized,
                             bias: str | None) -> list[onnx.NodeProto]:
        """``out = MatMulNBits(Concat(x, blocksum(x)), minimum_as_rows(W))``: the stored
        blocks with integer zero points, the minimum's remainder in the rows that read the
        block sums (edgert.model.block_quant.MinimumRows)."""
        folded = minimum_as_rows(w)
        nodes: list[onnx.NodeProto] = []
        b, scales = self._packed(name, folded.widened, nodes)
        zero_points = self._zero_points(name, folded.widened)
        x = self._with_blocksums(node.input[0], w.shape[1], nodes)
        prefix = node.name or node.output[0]
        nodes.append(self._nbits(x, (b, scales, zero_points), bias, node.output[0], prefix,
                                 folded.inputs, w.shape[0], folded.widened.bits))
        return nodes

    def _with_blocksums(self, x: str, k: int, nodes: list[onnx.NodeProto]) -> str:
        """``Concat(x, blocksum(x))`` [.., K + K/32], once per x."""
        if x not in self.widened:
            out = f"{x}/with_blocksums"
            nodes.append(helper.make_node("Concat", [x, self._blocksum(x, k, nodes)], [out],
                                          axis=-1, name=f"{out}/Concat"))
            self.widened[x] = out
        return self.widened[x]

    def _gather(self, tensor: str, rows: str, axis: int, nodes: list[onnx.NodeProto]) -> str:
        """``tensor``'s entries ``rows`` along ``axis`` (once per graph)."""
        out = f"{tensor}/rows_{rows}_{axis}"
        if out not in self.casts:
            nodes.append(helper.make_node("Gather", [tensor, rows], [out], axis=axis,
                                          name=f"{out}/Gather"))
            self.casts.add(out)
        return out

    def _blocksum(self, x: str, k: int, nodes: list[onnx.NodeProto]) -> str:
        if x in self.blocksums:
            return self.blocksums[x]
        shape = self._constant(np.array([0, 0, k // BLOCK, BLOCK], np.int64), f"blocks_{k}")
        last = self._constant(np.array([-1], np.int64), "last_axis")
        tag = f"{x}/blocksum"
        nodes += [helper.make_node("Reshape", [x, shape], [f"{tag}/blocks"],
                                   name=f"{tag}/Reshape"),
                  helper.make_node("ReduceSum", [f"{tag}/blocks", last], [tag], keepdims=0,
                                   name=f"{tag}/ReduceSum")]
        self.blocksums[x] = tag
        return tag

    def _dequantized_rows(self, name: str, w: BlockQuantized, ids: str | None, p: str
                          ) -> tuple[list[onnx.NodeProto], str]:
        """Nodes computing W's rows ``ids`` (1-D; None: every row) in fp32, [m, K], from the
        packed initializers: ``scale * (q - zero) (+ minimum)``, block by block."""
        if w.zero_point is not None:  # never produced for the vocabulary (8-bit at q4)
            raise ValueError(f"{name}: integer zero points are not expanded in the graph")
        nodes: list[onnx.NodeProto] = []
        b, scales = self._packed(name, w, nodes)
        n, k = w.shape
        const = self._constant
        last = const(np.array([-1], np.int64), "last_axis")
        q, s = b, scales
        if ids is not None:
            nodes += [helper.make_node("Gather", [b, ids], [f"{p}/q"], axis=0,
                                       name=f"{p}/GatherQ"),
                      helper.make_node("Gather", [scales, ids], [f"{p}/s"], axis=0,
                                       name=f"{p}/GatherScales")]
            q, s = f"{p}/q", f"{p}/s"
        nodes.append(helper.make_node("Cast", [q], [f"{p}/qf"], to=TensorProto.FLOAT,
                                      name=f"{p}/Cast"))
        q = f"{p}/qf"
        if w.bits == 4:  # byte j of a block: value 2j in the low nibble, 2j + 1 in the high
            sixteen = const(np.array(16, np.float32), "f32_16")
            nodes += [
                helper.make_node("Div", [q, sixteen], [f"{p}/high_frac"], name=f"{p}/Div"),
                helper.make_node("Floor", [f"{p}/high_frac"], [f"{p}/high"],
                                 name=f"{p}/Floor"),
                helper.make_node("Mul", [f"{p}/high", sixteen], [f"{p}/high16"],
                                 name=f"{p}/MulHigh"),
                helper.make_node("Sub", [q, f"{p}/high16"], [f"{p}/low"], name=f"{p}/SubLow"),
                helper.make_node("Unsqueeze", [f"{p}/low", last], [f"{p}/low1"],
                                 name=f"{p}/UnsqueezeLow"),
                helper.make_node("Unsqueeze", [f"{p}/high", last], [f"{p}/high1"],
                                 name=f"{p}/UnsqueezeHigh"),
                helper.make_node("Concat", [f"{p}/low1", f"{p}/high1"], [f"{p}/pairs"],
                                 axis=-1, name=f"{p}/Concat"),
                helper.make_node("Reshape", [f"{p}/pairs", const(
                    np.array([-1, k // BLOCK, BLOCK], np.int64), f"blocks3_{k}")],
                    [f"{p}/unpacked"], name=f"{p}/Unpack")]
            q = f"{p}/unpacked"
        zero = const(np.array(w.zero, np.float32), f"zero_{w.bits}")
        nodes += [helper.make_node("Sub", [q, zero], [f"{p}/centred"], name=f"{p}/Sub"),
                  helper.make_node("Unsqueeze", [s, last], [f"{p}/s1"], name=f"{p}/Unsqueeze"),
                  helper.make_node("Mul", [f"{p}/centred", f"{p}/s1"], [f"{p}/rows3"],
                                   name=f"{p}/Mul")]
        rows3 = f"{p}/rows3"
        if w.minimum is not None:
            table = self._correction(name, w, scales, nodes)  # [K/32, N]
            nodes += [helper.make_node("Transpose", [table], [f"{p}/corr_rows"], perm=[1, 0],
                                       name=f"{p}/TransposeCorrection")]
            corr = f"{p}/corr_rows"
            if ids is not None:
                nodes.append(helper.make_node("Gather", [corr, ids], [f"{p}/corr_ids"], axis=0,
                                              name=f"{p}/GatherCorrection"))
                corr = f"{p}/corr_ids"
            nodes += [helper.make_node("Unsqueeze", [corr, last], [f"{p}/corr1"],
                                       name=f"{p}/UnsqueezeCorrection"),
                      helper.make_node("Add", [rows3, f"{p}/corr1"], [f"{p}/rows3c"],
                                       name=f"{p}/AddCorrection")]
            rows3 = f"{p}/rows3c"
        flat = const(np.array([-1, k], np.int64), f"rows_{k}")
        nodes.append(helper.make_node("Reshape", [rows3, flat], [f"{p}/rows"],
                                      name=f"{p}/Reshape"))
        return nodes, f"{p}/rows"

    def _embedding(self, node: onnx.NodeProto, name: str, w: BlockQuantized
                   ) -> list[onnx.NodeProto]:
        """The tied embedding, Gather(lm_head_t [H, V], ids [q], axis=1) -> [H, q], from the
        quantized rows of the lm_head's own initializers."""
        p = node.name or node.output[0]
        nodes, rows = self._dequantized_rows(name, w, node.input[1], p)
        return nodes + [helper.make_node("Transpose", [rows], [node.output[0]], perm=[1, 0],
                                         name=f"{p}/Transpose")]


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


OWN_WEIGHT_BITS = 8  # the Medusa heads' own weights: trained in fp32, stored 8-bit


def quantize_own_weights(model: onnx.ModelProto, config: DecoderConfig,
                         accuracy_level: int = COMPUTE_MODES["int8"]) -> dict[str, dict]:
    """Quantize only ``model``'s own weight matrices to ``OWN_WEIGHT_BITS`` bits (round to
    nearest, in place), whatever the artifact's weights: for a graph whose outputs are only
    proposals that the backbone verifies (the draft layer), precision changes speed, not
    output. Returns a report row per weight."""
    rewriter = _GraphQuantizer(model.graph, {}, config, accuracy_level, OWN_WEIGHT_BITS)
    if rewriter.run() and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return rewriter.own


def quantize_graph(model: onnx.ModelProto, blocks: dict[str, BlockQuantized],
                   config: DecoderConfig, options: WeightOptions,
                   own_weights: bool = False) -> tuple[set[str], dict[str, dict]]:
    """Rewrite ``model``'s weight matmuls (and tied embedding) onto ``blocks``, in place;
    returns the HF weights it now reads quantized, and a report row per weight of its own it
    quantized: ``own_weights`` quantizes the weights only this graph has (the Medusa heads')
    to ``OWN_WEIGHT_BITS`` bits (round to nearest). Adds the com.microsoft opset if needed."""
    if not blocks:
        return set(), {}
    own_bits = OWN_WEIGHT_BITS if own_weights else None
    rewriter = _GraphQuantizer(model.graph, blocks, config, options.accuracy_level, own_bits)
    if rewriter.run() and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return rewriter.used, rewriter.own
