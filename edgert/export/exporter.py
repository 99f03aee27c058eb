"""``edgert export``: model source -> artifact directory (atomic)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgert.__about__ import __version__
from edgert.artifact.io import atomic_directory, hash_files, quick_checks, write_manifest
from edgert.artifact.manifest import (
    DRAFT_TREE_FIELDS,
    FORMAT,
    FORMAT_VERSION,
    GraphKey,
    KVCacheSpec,
    Manifest,
    TokenizerSpec,
)
from edgert.dhsa.params import DHSAParams
from edgert.errors import ConfigError
from edgert.export.decoder import Decoder
from edgert.export.draft_graph import DRAFT_FORMS, draft_graph_spec, trace_draft
from edgert.export.draft_layer import DraftLayer, load_draft
from edgert.export.graph_specs import decode_graph_spec
from edgert.export.medusa_graph import MEDUSA_FILE, medusa_graph_spec, trace_medusa
from edgert.export.onnx_graph import save_graphs_sharing_weights, trace_decoder
from edgert.export.quantize import (
    WeightOptions,
    plan_quantization,
    quantize_graph,
    quantize_own_weights,
    summarize,
)
from edgert.export.row_padding import MIN_ROWS, pad_lone_attention_rows
from edgert.medusa.tree_buffers import build_tree_buffers
from edgert.medusa.tree_presets import resolve_tree
from edgert.model.config import DecoderConfig
from edgert.model.draft_config import DRAFT_CONFIG
from edgert.model.loaded import LoadedModel
from edgert.model.medusa_heads import MedusaHeads, load_heads
from edgert.model.sources import REGISTERED_MODELS, load_model

GRAPH_FILES = {GraphKey.PORTABLE: "model.onnx", GraphKey.ORT_GQA: "model.ort.onnx"}
DHSA_FILE = "model.dhsa.onnx"
# graphs with weights of their own (not the backbone's), stored 8-bit in quantized artifacts
OWN_WEIGHT_GRAPHS = (MEDUSA_FILE, *(form.file for form in DRAFT_FORMS.values()))
WEIGHTS_FILE = "model.onnx.data"
TRACE_DIR = ".trace"  # inside the export's temporary directory: the traced graphs' weights
TOKENIZER_FILE = "tokenizer.json"
KV_MEMORY_FRACTION = 0.25  # the cache may take at most this share of available memory
DRAFT_TREES = "tree.json"  # in a draft directory: its tuned trees ("chain", "tree")


@dataclass(frozen=True)
class ExportOptions:
    """Options of ``edgert export``.

    ``max_context=None``: the model's maximum (lowered to fit memory). ``heads``: a Medusa
    heads directory; ``None`` takes the registered model's committed heads when it has some,
    ``use_heads=False`` exports without heads. ``draft``: an EAGLE-style draft layer
    directory (``edgert train-draft``), the same way (``use_draft=False``: none);
    ``draft_depth`` tokens are drafted per step.
    """

    max_context: int | None = None
    overwrite: bool = False
    heads: Path | None = None
    use_heads: bool = True
    medusa_topk: int = 10
    tree: str | Path | None = None  # a shipped tree name or a JSON file; None: the default
    dhsa: DHSAParams | None = field(default_factory=DHSAParams)  # None: no DHSA prefill graph
    weights: WeightOptions = field(default_factory=WeightOptions)  # --weights, --compute
    draft: Path | None = None
    use_draft: bool = True
    draft_topk: int = 4
    draft_depth: int = 1  # measured fastest on a 2-core CPU (README, Speculative modes)
    # the draft's own matrices: 8-bit with int8 compute in every artifact (its tokens are
    # verified, so this changes speed only), or "fp32" (kept as trained)
    draft_weights: str = "q8"
    # the draft directory's tuned trees (``DRAFT_TREES``), when it has them, instead of
    # ``draft_depth``
    use_draft_tree: bool = True


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dependency, but keep export usable without it
        return 1 << 40


def choose_capacity(config: DecoderConfig, requested: int | None,
                    log: Callable[[str], None]) -> int:
    """KV capacity: the request, else the model maximum lowered to fit memory (said in log)."""
    if requested is not None:
        if requested < 2:
            raise ConfigError(f"--max-context must be at least 2, got {requested}")
        if requested > config.max_context:
            window = (" (its sliding-attention window: edgert serves no context past it)"
                      if config.max_context < config.max_position_embeddings else "")
            raise ConfigError(
                f"--max-context {requested} exceeds the model's maximum context "
                f"{config.max_context}{window}; pass a value <= {config.max_context}")
        return requested
    capacity = config.max_context
    per_token = KVCacheSpec(1, config.num_hidden_layers, config.num_key_value_heads,
                            config.head_dim).bytes
    budget = int(_available_memory() * KV_MEMORY_FRACTION)
    if capacity * per_token > budget:
        lowered = max(256, budget // per_token // 256 * 256)
        log(f"note: KV cache for the full {capacity} tokens needs "
            f"{capacity * per_token / 2**20:.0f} MiB; capacity lowered to {lowered} "
            "(set --max-context to choose)")
        capacity = lowered
    return capacity


def resolve_heads(loaded: LoadedModel, options: ExportOptions) -> MedusaHeads | None:
    """The heads to export: --heads, else the registered model's committed heads, else none."""
    if not options.use_heads:
        return None
    path = options.heads
    if path is None:
        registered = REGISTERED_MODELS.get(loaded.source.get("registered_name", ""))
        default = registered.assets_dir / "heads" if registered else None
        if default is None or not (default / "heads.json").is_file():
            return None
        path = default
    return load_heads(Path(path), loaded.config)


def draft_directory(loaded: LoadedModel, options: ExportOptions) -> Path | None:
    """--draft, else the registered model's committed draft, else None."""
    if not options.use_draft:
        return None
    if options.draft is not None:
        return Path(options.draft)
    registered = REGISTERED_MODELS.get(loaded.source.get("registered_name", ""))
    default = registered.assets_dir / "draft" if registered else None
    if default is None or not (default / DRAFT_CONFIG).is_file():
        return None
    return default


def resolve_draft(loaded: LoadedModel, options: ExportOptions) -> DraftLayer | None:
    """The draft layer to export (``draft_directory``), or none."""
    path = draft_directory(loaded, options)
    return None if path is None else load_draft(path, loaded.config)


def tuned_draft_tree(directory: Path | None, chains: bool) -> dict | None:
    """The draft directory's tuned tree for how this artifact verifies (``chains``: int8
    activations, where ONNX Runtime verifies chains only; else trees), or None. The file
    ``DRAFT_TREES`` holds `edgert tune-tree --drafter draft --save` records under "chain"
    and "tree"."""
    file = None if directory is None else Path(directory) / DRAFT_TREES
    if file is None or not file.is_file():
        return None
    try:
        trees = json.loads(file.read_text())
        record = trees.get("chain" if chains else "tree")
        if record is not None and not all(
                isinstance(record[k], int) and not isinstance(record[k], bool) and record[k] >= 1
                for k in DRAFT_TREE_FIELDS):
            raise ValueError(f"{', '.join(DRAFT_TREE_FIELDS)} must be positive integers")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{file} is not a tuned draft tree file ({exc}); re-run `edgert "
                          "tune-tree --drafter draft --save` or export with --no-draft-tree"
                          ) from None
    return record


def _draft_manifest(draft: DraftLayer, options: ExportOptions, capacity: int,
                    config: DecoderConfig, quantized: bool, tree: dict | None) -> dict:
    """The manifest's ``draft`` section; ``tree``: the tuned tree it drafts (its cache holds
    the rows that tree drafts past the committed entries)."""
    extra = options.draft_depth
    if tree is not None:
        chain = tree["beam"] == 1 and tree["topk"] == 1 and tree["budget"] == tree["depth"]
        extra = max(extra, tree["depth"] if chain else tree["beam"] * (tree["depth"] - 1) + 1)
    spec = KVCacheSpec(capacity + extra, 1, config.num_key_value_heads, config.head_dim)
    weights = ("rtn8, int8 compute" if quantized or options.draft_weights == "q8"
               else "fp32")
    section = {"graph": GraphKey.DRAFT.value, "topk": options.draft_topk, "weights": weights,
               "depth": options.draft_depth, "output_vocab": draft.config.output_vocab,
               "kv_cache": dataclasses.asdict(spec),
               "draft_source": str(options.draft or "registered model's draft"),
               "training": draft.config.training}
    if draft.config.feature_layers:  # the decode graphs' features carry these layers too
        section["feature_layers"] = list(draft.config.feature_layers)
    if tree is not None:
        section["tree"] = tree
    return section


def resolve_export_tree(loaded: LoadedModel, heads: MedusaHeads, options: ExportOptions) -> dict:
    """--tree, else the registered model's tuned tree (models/<name>/tree.json), else 'cpu'."""
    spec = options.tree
    if spec is None:
        registered = REGISTERED_MODELS.get(loaded.source.get("registered_name", ""))
        tuned = registered.assets_dir / "tree.json" if registered else None
        spec = tuned if tuned is not None and tuned.is_file() else "cpu"
    name, choices = resolve_tree(spec, heads.config.num_heads, options.medusa_topk)
    tree = build_tree_buffers(choices, options.medusa_topk, heads.config.num_heads)
    tuned_for = None
    if Path(str(spec)).is_file():
        data = json.loads(Path(spec).read_text())
        tuned_for = data.get("tuned_for") if isinstance(data, dict) else None
    return {"name": name, "choices": [list(p) for p in tree.paths], "nodes": tree.size - 1,
            "tuned_for": tuned_for}


def _medusa_manifest(heads: MedusaHeads, topk: int, path: str) -> dict:
    cfg = heads.config
    return {"graph": GraphKey.MEDUSA.value, "num_heads": cfg.num_heads,
            "num_layers": cfg.num_layers, "projection": cfg.projection, "condition": cfg.condition,
            "output_vocab": cfg.output_vocab, "topk": topk, "heads_source": path,
            "training": cfg.training}


def _build_decoder(loaded: LoadedModel, variant: str, features: bool = False,
                   **core_options) -> Decoder:
    decoder = Decoder(loaded.config, attention=variant, features=features, **core_options)
    with torch.no_grad():
        decoder.load_hf_state_dict(loaded.state_dict)
    return decoder.eval()


def _eos_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids from the config plus the tokenizer's eos token (they can differ in HF dirs)."""
    from tokenizers import Tokenizer

    ids = list(loaded.config.eos_token_id)
    if loaded.tokenizer.eos_token:
        tok_id = Tokenizer.from_str(loaded.tokenizer.tokenizer_json).token_to_id(
            loaded.tokenizer.eos_token)
        if tok_id is not None and tok_id not in ids:
            ids.append(tok_id)
    return ids


def export_loaded(loaded: LoadedModel, output: Path, options: ExportOptions = ExportOptions(),
                  log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Export an already-loaded model to ``output`` (written atomically). The graphs are
    traced inside the temporary directory (``TRACE_DIR``, removed before the rename), so a
    killed export leaves only the temporary directory, which the next write removes."""
    config = loaded.config
    capacity = choose_capacity(config, options.max_context, log)
    heads = resolve_heads(loaded, options)
    if heads is not None and not 1 <= options.medusa_topk <= config.vocab_size:
        raise ConfigError(f"--medusa-topk must be in [1, {config.vocab_size}], got "
                          f"{options.medusa_topk}")
    draft = resolve_draft(loaded, options)
    if options.draft_weights not in ("q8", "fp32"):
        raise ConfigError(f"--draft-weights must be q8 or fp32, got {options.draft_weights!r}")
    if draft is not None and not (1 <= options.draft_topk <= draft.config.projected_vocab
                                  and options.draft_depth >= 1):
        raise ConfigError(f"--draft-topk must be in [1, {draft.config.projected_vocab}] and "
                          f"--draft-depth at least 1, got {options.draft_topk}, "
                          f"{options.draft_depth}")
    dhsa = _dhsa_for(config, capacity, options.dhsa, log)
    with atomic_directory(output, overwrite=options.overwrite) as tmp:
        graphs, graph_specs = _trace_graphs(loaded, heads, draft, dhsa, options,
                                            tmp / TRACE_DIR, log)
        medusa = tree = None
        if heads is not None:
            medusa = _medusa_manifest(heads, options.medusa_topk,
                                      str(options.heads or "registered model's heads"))
            tree = resolve_export_tree(loaded, heads, options)
        quantization = _quantize_graphs(graphs, loaded, options.weights, log)
        if quantization is not None and options.weights.compute == "int8":
            _pad_lone_attention_rows(graphs, graph_specs)
        if draft is not None and quantization is None and options.draft_weights == "q8":
            for form in DRAFT_FORMS.values():  # the same tensors, the same bytes (shared)
                own = quantize_own_weights(graphs[form.file], config)
            log(f"draft layer: {len(own)} matrices 8-bit, int8 compute")
        eos_ids = _eos_ids(loaded)
        log("writing the weights...")
        written = save_graphs_sharing_weights(graphs, tmp, WEIGHTS_FILE)
        del graphs
        shutil.rmtree(tmp / TRACE_DIR)
        (tmp / TOKENIZER_FILE).write_text(loaded.tokenizer.tokenizer_json)
        written.append(TOKENIZER_FILE)
        log("hashing files...")
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            edgert_version=__version__,
            architecture=loaded.architecture,
            config=config,
            dtype="float32",
            quantization=quantization,
            kv_cache=KVCacheSpec(capacity, config.num_hidden_layers,
                                 config.num_key_value_heads, config.head_dim),
            graphs=graph_specs,
            weights_file=WEIGHTS_FILE,
            tokenizer=TokenizerSpec(
                file=TOKENIZER_FILE,
                chat_template=loaded.tokenizer.chat_template,
                bos_token=loaded.tokenizer.bos_token,
                eos_token=loaded.tokenizer.eos_token,
                eos_token_ids=eos_ids,
                add_bos_token=loaded.tokenizer.add_bos_token,
            ),
            source=loaded.source,
            files=hash_files(tmp, written),
            file_checks=quick_checks(tmp, written),
            medusa=medusa,
            tree=tree,
            dhsa=dhsa.to_dict() if dhsa is not None else None,
            draft=(_draft_manifest(draft, options, capacity, config,
                                   quantized=quantization is not None,
                                   tree=tuned_draft_tree(
                                       draft_directory(loaded, options) if
                                       options.use_draft_tree else None,
                                       chains=options.weights.compute == "int8"
                                       and quantization is not None))
                   if draft is not None else None),
        )
        write_manifest(tmp, manifest.to_dict())
    log(f"wrote {output}")
    return output


def _dhsa_for(config: DecoderConfig, capacity: int, dhsa: DHSAParams | None,
              log: Callable[[str], None]) -> DHSAParams | None:
    """The DHSA prefill graph's parameters, or None (with the reason in ``log``)."""
    if dhsa is not None and config.attn_logit_softcapping:
        log("note: no DHSA prefill graph: DHSA does not implement attention soft-capping "
            "(prefill runs dense)")
        return None
    if dhsa is not None and capacity <= dhsa.min_context:
        log(f"note: no DHSA prefill graph: the KV capacity {capacity} is not above DHSA's "
            f"min_context {dhsa.min_context}")
        return None
    return dhsa


def _trace_graphs(loaded: LoadedModel, heads: MedusaHeads | None, draft: DraftLayer | None,
                  dhsa: DHSAParams | None, options: ExportOptions, workdir: Path,
                  log: Callable[[str], None]) -> tuple[dict, dict]:
    """Every graph of the artifact (file name -> ONNX model) and its manifest spec, the
    decode graphs traced one at a time into ``workdir``."""
    config = loaded.config
    graphs, graph_specs = {}, {}
    variants = list(GRAPH_FILES.items()) + ([(GraphKey.DHSA, DHSA_FILE)] if dhsa else [])
    for variant, file in variants:
        log(f"exporting {file} ({variant} attention)...")
        core_options = {"dhsa": dhsa} if variant == GraphKey.DHSA else {}
        # with a draft layer, the decode graphs return every row's features (its input)
        features = draft is not None
        layers = draft.config.feature_layers if draft is not None else ()
        graphs[file] = trace_decoder(_build_decoder(loaded, variant, features=features,
                                                    feature_layers=layers, **core_options),
                                     workdir / variant)
        graph_specs[variant] = decode_graph_spec(file, variant, config, features, layers)
    if heads is not None:
        log(f"exporting {MEDUSA_FILE} ({heads.config.num_heads} Medusa heads)...")
        untied = None if config.tie_word_embeddings else loaded.embedding()
        graphs[MEDUSA_FILE] = trace_medusa(heads, loaded.lm_head_t(), options.medusa_topk,
                                           untied)
        graph_specs[GraphKey.MEDUSA] = medusa_graph_spec(heads, options.medusa_topk)
    if draft is not None:  # ONNX Runtime's form and the portable one (TVM)
        untied = None if config.tie_word_embeddings else loaded.embedding()
        for key, form in DRAFT_FORMS.items():
            log(f"exporting {form.file} (draft layer, {form.variant} attention)...")
            graphs[form.file] = trace_draft(draft, config, loaded.lm_head_t(),
                                            options.draft_topk, untied, key)
            graph_specs[key] = draft_graph_spec(draft, options.draft_topk, key)
    return graphs, graph_specs


def _pad_lone_attention_rows(graphs: dict, graph_specs: dict) -> None:
    """int8 activations: ONNX Runtime's decode graph runs a lone row's attention as two rows
    (edgert.export.row_padding), so one-row plain steps equal speculative steps' rows."""
    file = GRAPH_FILES[GraphKey.ORT_GQA]
    if pad_lone_attention_rows(graphs[file]):
        spec = graph_specs[GraphKey.ORT_GQA]
        graph_specs[GraphKey.ORT_GQA] = dataclasses.replace(spec, min_attention_rows=MIN_ROWS)


def _quantize_graphs(graphs: dict, loaded: LoadedModel, options: WeightOptions,
                     log: Callable[[str], None]) -> dict | None:
    """Rewrite every graph's weight matmuls onto the block-quantized weights ``options``
    asks for (in place); the manifest's ``quantization`` section, None when all stay fp32."""
    blocks, report = plan_quantization(loaded, options)
    if not blocks:
        return None  # fp32 weights (the draft's own: ``_quantize_draft``)
    used: set[str] = set()
    own: dict[str, dict] = {}
    for file, graph in graphs.items():
        graph_used, graph_own = quantize_graph(graph, blocks, loaded.config, options,
                                               own_weights=file in OWN_WEIGHT_GRAPHS)
        used |= graph_used
        own.update(graph_own)
    requantized = [row for name, row in report.items() if name in used and row["requantized"]]
    log(f"weights: {len(used)} matrices in {options.weights} blocks "
        f"({len(requantized)} requantized), {len(own)} Medusa head / draft matrices 8-bit, "
        "compute "
        f"{options.compute}")
    return summarize({**{name: report[name] for name in used}, **own}, options)


def export_model(source: str, output: Path, options: ExportOptions = ExportOptions(),
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Load ``source`` (registered name, HF directory or GGUF) and export it to ``output``."""
    log(f"loading {source}...")
    loaded = load_model(source)
    return export_loaded(loaded, output, options, log)
