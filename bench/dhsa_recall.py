"""How much of dense attention a DHSA selection keeps: the attention-mass recall per layer.

    python -m bench.dhsa_recall ARTIFACT [--prompts 6:0,2:0,9:1] [--context 8192]
                                [--layers 0,4,...,28] [--query-stride 4]
                                [--setting NAME:KEY=VALUE,KEY=VALUE ...] [--json out.json]

A dense forward of the artifact's model (its own weights, in PyTorch) over bench/niah.py's
prompts (``depth_index:needle``) records every layer's rotated queries and keys. For each
setting (the artifact's DHSA parameters with overrides; ``fixed_chunk=N`` for the fixed-chunk
baseline) the NumPy reference selects each query block's keys, call by call as the runtime
does, and the score is the share of each query's dense softmax mass that falls on its block's
selected keys (1.0: the selection misses nothing the dense attention looks at), averaged over
the queries (every ``--query-stride``-th, the dense tail excluded) and heads of each layer.

Selections are made on the dense model's queries and keys: the recall isolates the selection
rule from the drift that sparse attention causes in later layers (bench/niah.py and
bench/niah_logprob.py measure the end result). It is a fast way to compare chunking rules:
about 10 s per setting, layer subset and prompt.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import common, niah

# docs/dhsa.md's table: the paper's form, the centring, finer boundaries, fixed chunks
DEFAULT_SETTINGS = [
    "paper form:center_keys=0,boundary_threshold=2,nms_radius=8",
    "centred:center_keys=1,boundary_threshold=2,nms_radius=8",
    "centred 1.5/4:center_keys=1,boundary_threshold=1.5,nms_radius=4",
    "centred 1.25/4:center_keys=1,boundary_threshold=1.25,nms_radius=4",
    "fixed 64:fixed_chunk=64",
    "fixed 16:fixed_chunk=16",
    "every key:fixed_chunk=1",
]


def recording_core(config, store: dict, layer: int):
    """A dense attention core (PyTorch SDPA, causal, GQA) that keeps the rotated q/k of its
    layer as float16 [H, T, D] in ``store[layer]``."""
    import torch

    class RecordingCore(torch.nn.Module):
        def forward(self, query, key, value, past_k, past_v, ctx):
            t = query.shape[1]
            h, hkv, d = (config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim)
            q = query.view(t, h, d).transpose(0, 1)
            k = key.view(t, hkv, d).transpose(0, 1)
            v = value.view(t, hkv, d).transpose(0, 1)
            store[layer] = (q.half().numpy(), k.half().numpy())
            out = torch.nn.functional.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
            return out.transpose(0, 1).reshape(1, t, h * d), k, v

    return RecordingCore()


def dense_queries_and_keys(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """([L, Hq, T, D], [L, Hkv, T, D]) float16 of a dense forward over ``ids``."""
    import torch

    config = model.config
    store: dict = {}
    for i, layer in enumerate(model.layers):
        layer.self_attn.core = recording_core(config, store, i)
    t = len(ids)
    empty = torch.zeros(1, config.num_key_value_heads, 0, config.head_dim)
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(t)[None], torch.zeros(1, 1, 1, 1),
              torch.tensor([t - 1]), *([empty] * (2 * config.num_hidden_layers)))
    return (np.stack([store[i][0] for i in range(len(store))]),
            np.stack([store[i][1] for i in range(len(store))]))


def layer_recall(q: np.ndarray, k: np.ndarray, starts: np.ndarray, params,
                 query_stride: int) -> np.ndarray:
    """Recall of every sampled (head, query) of one layer: q [Hq,T,D], k [Hkv,T,D]."""
    import torch

    from edgert.dhsa import reference

    q, k = q.astype(np.float32), k.astype(np.float32)
    seq_len, group = q.shape[1], q.shape[0] // k.shape[0]
    tail_start = seq_len - params.dense_tail
    qt = torch.from_numpy(q)
    kt = torch.from_numpy(k).repeat_interleave(group, 0)
    scale = 1.0 / np.sqrt(q.shape[2])
    out = []
    for start, end in reference.prefill_calls(seq_len, params):
        scores = reference.token_scores(q[:, :end], k[:, :end], starts[:end], params, start)
        selection = reference.select_keys(scores, end, params, start)
        for b in range(selection.index.shape[1]):
            first = start + b * params.block_size
            rows = np.arange(first, min(first + params.block_size, end, tail_start))
            rows = rows[::query_stride]
            if not len(rows):
                continue
            keys = rows[-1] + 1
            logits = torch.einsum("hqd,htd->hqt", qt[:, rows], kt[:, :keys]) * scale
            future = torch.arange(keys)[None, None] > torch.from_numpy(rows)[None, :, None]
            probs = torch.softmax(logits.masked_fill(future, -torch.inf), dim=-1)
            chosen = selection.keys(b)
            kept = torch.zeros(keys, dtype=torch.bool)
            kept[torch.from_numpy(chosen[chosen < keys])] = True
            out.append((probs * kept).sum(-1).flatten())
    return torch.cat(out).numpy()


def parse_setting(text: str, base):
    """``NAME:KEY=VALUE,...`` -> (NAME, the artifact's DHSA parameters with the overrides)."""
    name, _, overrides = text.partition(":")
    return name, base.with_settings([o for o in overrides.split(",") if o])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--prompts", default="6:0,2:0,9:1",
                        help="depth_index:needle of bench/niah.py's prompts")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--layers", default=None, help="default: every fourth layer")
    parser.add_argument("--query-stride", type=int, default=4)
    parser.add_argument("--setting", action="append", default=None,
                        help="NAME:KEY=VALUE,... over the artifact's DHSA parameters "
                             "(default: docs/dhsa.md's table)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    import edgert
    from edgert.dhsa import reference
    from edgert.export.decoder import Decoder
    from edgert.model.sources import load_model

    engine = edgert.load(args.artifact, verify=False)
    if engine.dhsa is None:
        parser.error(f"{args.artifact} has no DHSA parameters (exported with --no-dhsa)")
    settings = [parse_setting(s, engine.dhsa) for s in (args.setting or DEFAULT_SETTINGS)]
    loaded = load_model(engine.manifest.source["path"])
    model = Decoder(loaded.config)
    model.load_hf_state_dict(loaded.state_dict)
    model.eval()
    n_layers = loaded.config.num_hidden_layers
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else list(range(0, n_layers, 4)))
    recalls = {name: {layer: [] for layer in layers} for name, _ in settings}
    chunks = {name: [] for name, _ in settings}
    for spec in args.prompts.split(","):
        depth_index, needle = (int(x) for x in spec.split(":"))
        prompt, _ = niah.build_prompt(engine, args.context, depth_index / 10,
                                      niah.needle_seed(args.context, depth_index, needle))
        q, k = dense_queries_and_keys(model, engine.encode(prompt))
        for name, params in settings:
            at = params.boundary_layer
            starts = reference.causal_chunk_starts(q[at].astype(np.float32),
                                                   k[at].astype(np.float32), params)
            chunks[name].append(int(starts.sum()))
            for layer in layers:
                recalls[name][layer].append(
                    layer_recall(q[layer], k[layer], starts, params.for_layer(layer),
                                 args.query_stride))
    rows = []
    for name, _ in settings:
        per_layer = {layer: float(np.concatenate(r).mean()) for layer, r in
                     recalls[name].items()}
        every = np.concatenate([np.concatenate(r) for r in recalls[name].values()])
        rows.append({"setting": name, "chunks": round(float(np.mean(chunks[name]))),
                     "recall": round(float(every.mean()), 4),
                     "below_0.8": round(float((every < 0.8).mean()), 4),
                     **{f"L{layer}": round(v, 3) for layer, v in per_layer.items()}})
    record = {"bench": "dhsa_recall", "artifact": args.artifact, "context": args.context,
              "prompts": args.prompts, "settings": {n: p.to_dict() for n, p in settings},
              "machine": common.machine(), "rows": rows}
    common.emit(record, rows, list(rows[0]), args.json_path)


if __name__ == "__main__":
    main()
