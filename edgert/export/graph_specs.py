"""Documented input/output specs of the decode graphs (written into the manifest)."""

from __future__ import annotations

from edgert.artifact.manifest import WHOLE_BIAS_AXIS, GraphSpec, TensorSpec
from edgert.export.attention import ATTENTION_VARIANTS
from edgert.model.config import DecoderConfig


def _head_outputs(config: DecoderConfig) -> list[TensorSpec]:
    return [
        TensorSpec("logits", [1, "n", config.vocab_size], "float32", "next-token logits"),
        TensorSpec("hidden", [1, "n", config.hidden_size], "float32",
                   "final-norm hidden state (the Medusa heads' input)"),
    ]


def _features_output(config: DecoderConfig, feature_layers: tuple[int, ...]) -> TensorSpec:
    residual = (f", then the residual stream after layers {list(feature_layers)}"
                if feature_layers else "")
    return TensorSpec("features", [1, "q", (1 + len(feature_layers)) * config.hidden_size],
                      "float32", "every new token's final-norm hidden state" + residual
                      + " (the draft layer's input)")


def decode_graph_spec(file: str, variant_name: str, config: DecoderConfig,
                      features: bool = False, feature_layers: tuple[int, ...] = ()
                      ) -> GraphSpec:
    """``features``: the graph also returns every row's hidden state (artifacts with a draft
    layer), and the residual stream after ``feature_layers`` (a multi-layer draft)."""
    variant = ATTENTION_VARIANTS[variant_name]
    hkv, d = config.num_key_value_heads, config.head_dim
    cache_len = "capacity" if variant.shared_cache else "past"
    inputs = [
        TensorSpec("input_ids", [1, "q"], "int64", "the q new tokens"),
        TensorSpec("position_ids", [1, "q"], "int64",
                   "absolute positions: prefix length + index (prefill), + tree depth (tree)"),
        TensorSpec("tree_mask", [1, 1, "q", "q"], "float32",
                   "additive mask among the new tokens: 0 where token i may see token j "
                   "(causal for prefill, ancestors for a tree), -1e9 elsewhere; every new "
                   "token sees the whole cached prefix"),
        TensorSpec("logits_index", ["n"], "int64",
                   "which of the q positions to return logits and hidden states for"),
    ]
    if variant.prefill_only:
        return _prefill_graph_spec(file, variant_name, config, inputs, features,
                                   feature_layers)
    if variant.shared_cache:
        inputs[2] = TensorSpec(
            "tree_mask", [1, 1, "q", WHOLE_BIAS_AXIS], "float32",
            "additive mask, 0 where a new token may attend and -1e9 elsewhere: [q, q] over the "
            "new tokens (causal for prefill, ancestors for a tree; every cached entry visible), "
            "or [q, prefix + q] over the cached entries too (sequences sharing the cache)")
        inputs += [
            TensorSpec("seqlens_k", [1], "int32", "prefix length + q - 1"),
            TensorSpec("total_sequence_length", [], "int32", "prefix length + q"),
        ]
    outputs = _head_outputs(config)
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            if variant.shared_cache:
                inputs.append(TensorSpec(f"past_{kind}_{i}", [1, hkv, "capacity", d], "float32",
                                         f"layer {i} {kind} cache buffer, bound in place"))
                outputs.append(TensorSpec(
                    f"present_{kind}_{i}", [1, hkv, "capacity", d], "float32",
                    f"the same buffer as past_{kind}_{i}; the q new entries written at "
                    "[prefix, prefix+q)"))
            else:
                inputs.append(TensorSpec(f"past_{kind}_{i}", [1, hkv, cache_len, d], "float32",
                                         f"layer {i} cached {kind}s of the prefix"))
                outputs.append(TensorSpec(f"present_{kind}_{i}", [1, hkv, "q", d], "float32",
                                          f"layer {i} {kind}s of the q new tokens"))
    if features:
        outputs.append(_features_output(config, feature_layers))
    return GraphSpec(file=file, attention=variant_name, shared_cache=variant.shared_cache,
                     inputs=inputs, outputs=outputs)


def _prefill_graph_spec(file: str, variant_name: str, config: DecoderConfig,
                        common: list[TensorSpec], features: bool = False,
                        feature_layers: tuple[int, ...] = ()) -> GraphSpec:
    """A prefill-call graph (DHSA): q prompt tokens after the P cached ones, no tree mask
    (causal inside); the cache buffers are read and written in place."""
    hkv, d = config.num_key_value_heads, config.head_dim
    inputs = [t for t in common if t.name != "tree_mask"]
    inputs += [
        TensorSpec("dhsa_fixed_chunk", [], "int64",
                   "0: DHSA's dynamic chunk boundaries; N > 0: fixed N-token chunks "
                   "(the block-sparse baseline)"),
        TensorSpec("prompt_length", [], "int64",
                   "tokens in the whole prompt (its last dense_tail attend densely)"),
        TensorSpec("past_chunk_starts", ["past"], "bool",
                   "chunk starts of the P cached prompt tokens (the earlier calls' "
                   "chunk_starts); P is the cached prefix length"),
    ]
    outputs = _head_outputs(config)
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past_{kind}_{i}", [1, hkv, "capacity", d], "float32",
                                     f"layer {i} {kind} cache buffer, bound in place (read: "
                                     "its first P entries)"))
            outputs.append(TensorSpec(f"present_{kind}_{i}", [1, hkv, "capacity", d],
                                      "float32", f"the same buffer as past_{kind}_{i}; the q "
                                      "new entries written at [P, P+q)"))
    outputs.append(TensorSpec("chunk_starts", ["q"], "bool",
                              "which of the q new tokens start a key chunk"))
    if features:
        outputs.append(_features_output(config, feature_layers))
    return GraphSpec(file=file, attention=variant_name, shared_cache=False, inputs=inputs,
                     outputs=outputs)
