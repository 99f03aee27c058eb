"""The Engine apps embed: load an artifact once, then generate or stream text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact.io import load_manifest
from edgert.artifact.manifest import DRAFT_TREE_FIELDS, GraphKey
from edgert.dhsa.params import DHSAParams
from edgert.errors import CapacityError, GenerationError
from edgert.medusa.tree_buffers import TreeBuffers, build_tree_buffers
from edgert.runtime.backends import StepOutputs, create_backend
from edgert.runtime.draft import DraftState
from edgert.runtime.prefix import reusable_prefix
from edgert.runtime.sampling import SamplingParams, select_token
from edgert.runtime.slot import SequenceSlot
from edgert.runtime.speculative import (
    ACCEPTANCE,
    DEFAULT_TYPICAL_ALPHA,
    DEFAULT_TYPICAL_THRESHOLD,
    accept,
    propose_tree,
    verify_tree,
)
from edgert.runtime.steps import decode_one, forward_block, prefill, prefill_sparse
from edgert.runtime.structured import JsonPolicy, VocabMasks, check_schema
from edgert.runtime.tokenizer import Messages, StreamDecoder, Tokenizer
from edgert.speculative.dynamic_tree import DraftTreeParams
from edgert.speculative.lookup import LookupParams, PromptLookup
from edgert.speculative.token_tree import DRAFTERS, TokenTree, TokenTreeBuilder, source_bit

Prompt = str | Messages
DEFAULT_PREFILL_CHUNK = 512


@dataclass
class Result:
    """What ``Engine.generate`` returns."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
                "stats": self.stats}


class Engine:
    """A loaded artifact: tokenizer, backend session and the fixed-capacity KV cache.

    Parameters
    ----------
    path : artifact directory written by ``edgert export``.
    backend : ``"ort"`` (ONNX Runtime) or ``"tvm"`` (the module ``edgert compile`` built).
    device : ``"cpu"`` or ``"cuda"``.
    threads : intra-op threads (0 = ONNX Runtime's default: the physical cores).
    verify : check the artifact's files at load: True (quick: sizes and sampled digests of
        the large files, SHA-256 of the rest), "full" (SHA-256 of every byte; ``edgert
        verify``), False (none).
    kv_on_device : where the KV cache lives; None = the backend's choice (host memory for ort
        and tvm on cpu; the GPU's memory for tvm on cuda). True with ``backend="tvm",
        device="cpu"`` runs the GPU's cache code path (TVM-allocated buffers, the commit
        kernel) on the CPU.
    prefix_reuse : keep the last generation's K/V and prefill only what a new prompt adds to
        it (the same system prompt, the next turn of a chat: ``edgert.runtime.prefix``);
        ``stats["reused_tokens"]`` counts the tokens taken from the cache. Off by default: a
        reused prefix equals a fresh prefill only up to rounding (see that module).
    """

    def __init__(self, path: str | Path, backend: str = "ort", device: str = "cpu",
                 threads: int = 0, verify: bool | str = True,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 kv_on_device: bool | None = None, prefix_reuse: bool = False) -> None:
        self.path = Path(path)
        self.manifest = load_manifest(self.path, verify=verify)
        self.tokenizer = Tokenizer(self.path, self.manifest.tokenizer)
        self.backend = create_backend(backend, self.path, self.manifest, device, threads,
                                      kv_on_device)
        self.cache = self.backend.cache
        self.slot = SequenceSlot()  # one generation at a time over the cache
        self.backend_name, self.device = backend, device
        self.prefill_chunk = prefill_chunk
        self.eos_ids = set(self.manifest.tokenizer.eos_token_ids)
        self.dhsa = DHSAParams.from_manifest(self.manifest) if self.backend.has_dhsa else None
        # DHSA chunking: 0 = dynamic boundaries; N > 0 = fixed N-token chunks (a baseline),
        # as exported (``--dhsa fixed_chunk=N``) unless set here
        self.dhsa_fixed_chunk = self.dhsa.fixed_chunk if self.dhsa else 0
        # ONNX Runtime's int8-activation matmuls turn the rounding-level differences between
        # a one-row and a multi-row attention, or between a chain and a branching tree (masked
        # siblings change the attention's summation), into logit differences of ~0.5. Plain
        # steps then run their attention as two rows (inside the graph where the artifact pads
        # a lone row, ``min_attention_rows``; else as two-row forwards, ``steps.decode_one``)
        # and verification trees are chains, whose rows reproduce plain steps bit for bit:
        # every mode stays lossless.
        quantization = self.manifest.quantization or {}
        self.row_exact = backend == "ort" and quantization.get("accuracy_level") == 4
        graph = self.manifest.graphs.get(GraphKey.ORT_GQA)
        padded = graph is not None and graph.min_attention_rows >= 2
        self.decode_rows = 2 if self.row_exact and not padded else 1
        self.tree: TreeBuffers | None = None
        if self.backend.has_heads and self.manifest.tree:
            self.set_tree(self.manifest.tree["choices"])
        self._vocab_masks: VocabMasks | None = None
        # tokens the draft layer drafts per step: its chain's length at int8 activations, its
        # tree's depth otherwise (the artifact's ``draft.depth``, ``--draft-depth``; settable)
        self.draft_depth = int((self.manifest.draft or {}).get("depth", 0))
        # the draft layer's dynamic tree (fp32 artifacts; int8 ones verify its chain)
        self.draft_tree = DraftTreeParams(depth=max(1, self.draft_depth),
                                          topk=min(2, int((self.manifest.draft or {}).get(
                                              "topk", 2))))
        tuned = (self.manifest.draft or {}).get("tree")
        if tuned and self._tuned_here(tuned.get("tuned_for", {})):
            self.set_draft_tree(DraftTreeParams(*(tuned[k] for k in DRAFT_TREE_FIELDS)))
        self.prefix_reuse = prefix_reuse
        self._cached_ids: list[int] = []  # the tokens whose K/V fill cache[0:len], in order
        # draft-cache rows valid for those tokens (rows 1..n: x_p and the backbone's h_{p-1})
        self._draft_rows = 0

    @property
    def vocab_masks(self) -> VocabMasks:
        """The token classes structured output masks with (computed on first use)."""
        if self._vocab_masks is None:
            self._vocab_masks = VocabMasks(self.tokenizer, self.manifest.config.vocab_size)
        return self._vocab_masks

    def json_policy(self, schema: dict) -> JsonPolicy:
        """A fresh structured-output policy for one request whose reply must validate
        against ``schema`` (SchemaError names an unsupported keyword)."""
        check_schema(schema)
        return JsonPolicy(schema, self.vocab_masks)

    def set_tree(self, choices) -> None:
        """Use another Medusa tree (list of top-k rank paths) from now on."""
        medusa = self.manifest.medusa
        self.tree = build_tree_buffers(choices, medusa["topk"], medusa["num_heads"])
        self._tree_mask = self.tree.additive_mask()
        self._medusa_sources = np.full(self.tree.size, source_bit("medusa"), dtype=np.int64)
        self._medusa_sources[0] = 0
        # the heads' top-1 chain: the nodes whose ranks are all 0
        self._medusa_chain = np.array([i + 1 for i, p in enumerate(self.tree.paths)
                                       if not any(p)], dtype=np.int64)

    @property
    def has_medusa(self) -> bool:
        return self.tree is not None

    @property
    def medusa_by_default(self) -> bool:
        """Medusa unless the tree was tuned and predicted slower than plain decoding."""
        if not self.has_medusa:
            return False
        tuned = (self.manifest.tree or {}).get("tuned_for") or {}
        predicted, plain = tuned.get("predicted_tokens_per_s"), tuned.get("plain_tokens_per_s")
        return predicted is None or plain is None or predicted > plain

    # -- single forwards over the cache: for tools above the Engine (eval-heads, tune-tree,
    #    benches); the decode loop's own phase functions on this engine's backend and cache --
    def reset(self) -> None:
        """Empty the KV cache (its memory stays allocated)."""
        self._cached_ids, self._draft_rows = [], 0
        self.cache.reset()

    @property
    def capacity(self) -> int:
        """The KV cache's fixed capacity, in tokens."""
        return self.cache.capacity

    def prefill_ids(self, ids: list[int], sparse: bool = False) -> StepOutputs:
        """Append ``ids`` to the cache (DHSA when ``sparse``, into an empty cache); returns
        the last token's logits and hidden state ([1,V], [1,H])."""
        self._cached_ids, self._draft_rows = [], 0
        if sparse:
            return prefill_sparse(self.backend, self.cache, ids, self.dhsa_fixed_chunk)
        return prefill(self.backend, self.cache, ids, self.prefill_chunk)

    def decode_token(self, token: int) -> StepOutputs:
        """Append one token to the cache; returns its logits and hidden state."""
        self._cached_ids, self._draft_rows = [], 0
        return decode_one(self.backend, self.cache, token, self.decode_rows)

    def forward_uncommitted(self, ids: list[int] | np.ndarray) -> StepOutputs:
        """A causal forward of ``ids`` after the cache that leaves its length unchanged (the
        next call overwrites their entries): timing a verification-sized step."""
        return forward_block(self.backend, self.cache, ids, logits_rows="all")

    def logprobs(self, ids: list[int], chunk: int = 256) -> np.ndarray:
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1 ([len(ids) - 1] float64), the
        text scored in causal chunks over the cache (perplexity: ``exp(-mean)``). Resets the
        cache first; ``len(ids)`` must fit its capacity."""
        if len(ids) < 2:
            raise GenerationError("scoring needs at least two tokens")
        if len(ids) > self.capacity:
            raise CapacityError(f"{len(ids)} tokens exceed the KV capacity {self.capacity}; "
                                "score a shorter text or re-export with a larger --max-context")
        self.reset()
        out = np.empty(len(ids) - 1)
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start:start + chunk]
            logits = forward_block(self.backend, self.cache, piece, logits_rows="all").logits
            self.cache.advance(len(piece))
            logits = logits.astype(np.float64)
            shifted = logits - logits.max(axis=-1, keepdims=True)
            logz = np.log(np.exp(shifted).sum(axis=-1))
            targets = ids[start + 1:start + 1 + len(piece)]
            rows = np.arange(len(targets))
            out[start:start + len(targets)] = shifted[rows, targets] - logz[rows]
        return out

    def head_candidates(self, hidden: np.ndarray, roots: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The Medusa heads' top-k ids and scores [K,m,k] for hidden states [m,H] whose next
        tokens are ``roots`` [m]."""
        if not self.backend.has_heads:
            raise GenerationError(f"artifact {self.path} has no Medusa heads; export it with "
                                  "--heads (or train some with `edgert train-heads`)")
        return self.backend.medusa_topk(np.asarray(hidden, dtype=np.float32),
                                        np.asarray(roots, dtype=np.int64))

    @property
    def has_heads(self) -> bool:
        return self.backend.has_heads

    @property
    def has_draft(self) -> bool:
        """Whether the artifact has a draft layer this backend runs."""
        return getattr(self.backend, "has_draft", False)


    # -- prompt handling ------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
        _check_text(prompt)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise GenerationError("the prompt is empty; pass some text")
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode_raw(prompt)
        if isinstance(prompt, list):
            if not chat:
                raise GenerationError("a list of messages needs chat=True; pass a string for a "
                                      "raw prompt")
            return self.tokenizer.encode_chat(prompt)
        raise GenerationError(f"prompt must be a string or a list of messages, got "
                              f"{type(prompt).__name__}")

    def _check_request(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got "
                                  f"{max_new_tokens!r}")
        if not prompt_ids:
            raise GenerationError("the prompt encodes to no tokens; pass some text")
        need = len(prompt_ids) + max_new_tokens
        if need > self.cache.capacity:
            raise CapacityError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                f"exceeds the KV capacity {self.cache.capacity} of this artifact; lower "
                "max_new_tokens, shorten the prompt, or re-export with a larger --max-context")

    # -- the loop -------------------------------------------------------------------------
    @dataclass
    class _Options:
        max_new_tokens: int
        params: SamplingParams
        drafters: tuple[str, ...]  # () = plain decoding
        threshold: float
        alpha: float
        ignore_eos: bool = False
        dhsa: bool | None = None
        lookup: LookupParams = field(default_factory=LookupParams)
        acceptance: str = "rejection"
        json_schema: dict | None = None  # structured output: the reply validates against it

    def _generate_ids(self, prompt_ids: list[int], opts: Engine._Options,
                      stats: dict[str, Any]) -> Iterator[int]:
        """Prefill then decode (plain or Medusa); yields each new token id until EOS or the
        limit; fills ``stats`` as it goes."""
        with self.slot.hold():
            yield from self._generate_held(prompt_ids, opts, stats)

    def _generate_held(self, prompt_ids: list[int], opts: Engine._Options,
                       stats: dict[str, Any]) -> Iterator[int]:
        """The generation, remembering which tokens' K/V it leaves in the cache (for the next
        request's prefix reuse): its prompt and the new tokens the cache holds, however the
        generation ends (a stream closed early included; none after an error)."""
        drafting = "draft" in opts.drafters
        reuse = self._reusable_prefix(prompt_ids, opts.dhsa, drafting)
        self._cached_ids, self._draft_rows = [], 0
        fed = list(prompt_ids)
        ok = False
        try:
            for token in self._prefill_and_decode(prompt_ids, reuse, opts, stats):
                fed.append(token)
                yield token
            ok = True
        except GeneratorExit:  # the caller closed the stream: the cache is consistent
            ok = True
            raise
        finally:
            if ok and self.prefix_reuse:
                # a verification step may have committed tokens not yet emitted: cut there
                self._cached_ids = fed[:min(self.cache.length, len(fed))]
                if drafting:
                    self._draft_rows = min(self.backend.draft_cache.length,
                                           len(self._cached_ids))

    def _reusable_prefix(self, prompt_ids: list[int], dhsa: bool | None,
                         drafting: bool = False) -> int:
        """Prompt tokens to take from the cache: none when reuse is off, or when the rest of
        the prompt is long enough for DHSA prefill (which starts from an empty cache). With
        the draft layer, no more than its cache holds rows for: the draft's first new row
        reads the feature of the last reused position, so that position is computed again."""
        if not self.prefix_reuse:
            return 0
        reuse = reusable_prefix(self._cached_ids, prompt_ids)
        if drafting:
            reuse = max(0, min(reuse - 1, self._draft_rows))
        if reuse and self._use_dhsa(dhsa, len(prompt_ids) - reuse):
            return 0
        return reuse

    def _prefill_and_decode(self, prompt_ids: list[int], reuse: int, opts: Engine._Options,
                            stats: dict[str, Any]) -> Iterator[int]:
        rng = np.random.default_rng(opts.params.seed)
        if reuse:
            self.cache.truncate(reuse)
        else:
            self.cache.reset()
        sparse = not reuse and self._use_dhsa(opts.dhsa, len(prompt_ids))
        t0 = time.perf_counter()
        if sparse:
            out = prefill_sparse(self.backend, self.cache, prompt_ids, self.dhsa_fixed_chunk)
        else:
            out = prefill(self.backend, self.cache, prompt_ids[reuse:], self.prefill_chunk)
        t1 = time.perf_counter()
        stats["prefill_ms"] = (t1 - t0) * 1e3
        stats["prefill"] = "dhsa" if sparse else "dense"
        stats["reused_tokens"] = reuse
        stats["speculative"] = "+".join(opts.drafters) or "off"
        if opts.json_schema is not None:
            loop = self._structured_tokens(out, self.json_policy(opts.json_schema),
                                           opts.params, rng, stats)
        else:
            first = select_token(out.logits[-1], opts.params, rng)
            loop = (self._speculative_tokens(out, prompt_ids, first, opts, rng, stats)
                    if opts.drafters else self._plain_tokens(first, opts.params, rng, stats))
        new = 0
        for token in loop:
            new += 1
            stats["new_tokens"] = new
            yield token
            if token in self.eos_ids and not opts.ignore_eos:
                stats["finish_reason"] = "stop"
                break
            if new >= opts.max_new_tokens:
                stats["finish_reason"] = "length"
                break
        else:  # the loop ended by itself: structured output is complete
            stats["finish_reason"] = "stop"
        elapsed = time.perf_counter() - t1
        # the first token comes from prefill; the rest from decode forwards
        stats["decode_tokens_per_s"] = (new - 1) / elapsed if new > 1 and elapsed > 0 else 0.0

    def _use_dhsa(self, requested: bool | None, prompt_len: int) -> bool:
        """Default: DHSA above its min_context; True forces it for any prompt longer than its
        budget. A prompt no longer than the budget selects every key, which is dense
        attention exactly, so it prefills densely either way."""
        if requested is False:
            return False
        if self.dhsa is None:
            if requested:
                raise GenerationError(
                    "this artifact has no DHSA prefill graph; re-export it with a KV capacity "
                    f"above dhsa.min_context ({DHSAParams().min_context} by default; --dhsa "
                    "min_context=N lowers it) or pass dhsa=False")
            return False
        if prompt_len <= self.dhsa.budget:
            return False
        return bool(requested) or prompt_len > self.dhsa.min_context

    def _plain_tokens(self, token: int, params: SamplingParams, rng: np.random.Generator,
                      stats: dict[str, Any], emitted: bool = False) -> Iterator[int]:
        """One forward per token; ``token`` is the pending one (yielded first unless
        ``emitted``)."""
        if not emitted:
            yield token
        while True:
            out = decode_one(self.backend, self.cache, token, self.decode_rows)
            stats["steps"] += 1
            token = select_token(out.logits[-1], params, rng)
            yield token

    def _structured_tokens(self, out: StepOutputs, policy: JsonPolicy, params: SamplingParams,
                           rng: np.random.Generator, stats: dict[str, Any]) -> Iterator[int]:
        """JSON-schema output: each forward reads what the policy appended (a choice and the
        forced tokens after it) and gives the logits of the next choice."""
        while True:
            tokens = policy.step(out.logits[-1], params, rng)
            yield from tokens
            if policy.done:
                return
            out = forward_block(self.backend, self.cache, tokens)
            self.cache.advance(len(tokens))
            stats["steps"] += 1

    def _speculative_tokens(self, out, prompt_ids: list[int], token: int,
                            opts: Engine._Options, rng: np.random.Generator,
                            stats: dict[str, Any]) -> Iterator[int]:
        """One tree verification per step over what the drafters propose (a plain step when
        they propose nothing); falls back to plain steps when the tree no longer fits in the
        cache (near the capacity)."""
        medusa = "medusa" in opts.drafters
        lookup = PromptLookup(opts.lookup) if "lookup" in opts.drafters else None
        if lookup is not None:
            lookup.reset([*prompt_ids, token])
        draft = None
        if "draft" in opts.drafters:
            draft = DraftState(self.backend, self.draft_depth)
            # the prefill's features start at the first position it computed
            draft.start(prompt_ids, token, out.features, keep=stats["reused_tokens"])
        accepted_by = stats.setdefault("accepted_by", dict.fromkeys(opts.drafters, 0))
        yield token
        head_ids = self._heads(out.hidden[-1:], token) if medusa else None
        emitted = 0
        while True:
            step = self._step_tree(token, head_ids, lookup, draft)
            if self.cache.length + (step.size if step else 1) > self.cache.capacity:
                break
            if step is None:  # nothing drafted: one plain step
                out = decode_one(self.backend, self.cache, token, self.decode_rows)
                new, last = [select_token(out.logits[0], opts.params, rng)], 0
                rows = np.zeros(1, dtype=np.int64)
            else:
                buffers, tokens, mask, tree = step.buffers, step.tokens, step.mask, step.tree
                out = verify_tree(self.backend, self.cache, buffers, tokens, mask)
                acc = accept(buffers, tokens, out.logits, opts.params, rng, opts.threshold,
                             opts.alpha, opts.acceptance)
                self.cache.commit_path(acc.nodes)
                new, last = [*tokens[acc.nodes[1:]].tolist(), acc.next_token], acc.nodes[-1]
                rows = acc.nodes
                for name, count in tree.proposed_by(acc.nodes[1:]).items():
                    if name in accepted_by:
                        accepted_by[name] += count
            stats["steps"] += 1
            emitted += len(new)
            stats["mean_accepted"] = emitted / stats["steps"]
            yield from new
            token = new[-1]
            if lookup is not None:
                lookup.extend(new)
            if draft is not None:  # the backbone's features at the rows before the new tokens
                draft.accept(new, out.features[rows])
            if medusa:
                head_ids = self._heads(out.hidden[[last]], token)
        yield from self._plain_tokens(token, opts.params, rng, stats, emitted=True)

    @dataclass(frozen=True)
    class _StepTree:
        buffers: TreeBuffers
        tokens: np.ndarray
        mask: np.ndarray
        tree: TokenTree  # which drafter proposed each node

        @property
        def size(self) -> int:
            return len(self.tokens)

    def _step_tree(self, root: int, head_ids: np.ndarray | None,
                   lookup: PromptLookup | None, draft: DraftState | None = None
                   ) -> Engine._StepTree | None:
        """This step's verification tree: the drafters' proposals merged under ``root``;
        None when none proposed anything."""
        if self.verifies_chains:
            return self._step_chain(root, head_ids, lookup, draft)
        if lookup is None and draft is None:  # Medusa alone: its static tree, mask computed once
            tokens = propose_tree(self.tree, root, head_ids)
            return Engine._StepTree(self.tree, tokens, self._tree_mask,
                                    TokenTree(self.tree, tokens, self._medusa_sources))
        builder = TokenTreeBuilder(root)
        if draft is not None:
            proposal = draft.propose_tree(self.draft_tree)
            if proposal is not None:
                builder.add("draft", *proposal)
        if head_ids is not None:
            builder.add("medusa", self.tree.parents, propose_tree(self.tree, root, head_ids))
        if lookup is not None:
            builder.add_chain("lookup", lookup.propose())
        if builder.size == 1:
            return None
        tree = builder.build()
        return Engine._StepTree(tree.buffers, tree.tokens, tree.buffers.additive_mask(), tree)

    def _step_chain(self, root: int, head_ids: np.ndarray | None,
                    lookup: PromptLookup | None, draft: DraftState | None = None
                    ) -> Engine._StepTree | None:
        """A chain to verify (``row_exact``). The draft layer's leads when there is one
        (prompt lookup's replaces it where it starts with the same token and runs longer: the
        draft confirms the copy); without it, prompt lookup's, else the heads' top-1 chain.
        The others join where their chains agree."""
        chains = []
        if draft is not None:
            chains.append(("draft", draft.propose()))
        if lookup is not None:
            chains.append(("lookup", lookup.propose()))
        if head_ids is not None:
            tokens = propose_tree(self.tree, root, head_ids)
            chains.append(("medusa", tokens[self._medusa_chain].tolist()))
        chains = [(name, chain) for name, chain in chains if chain]
        if not chains:
            return None
        builder = TokenTreeBuilder(root)
        base = chains[0][1]
        if chains[0][0] == "draft" and len(chains) > 1 and chains[1][0] == "lookup":
            copy = chains[1][1]
            if copy[0] == base[0] and len(copy) > len(base):
                base = copy
        for name, chain in chains:
            if chain[:len(base)] == base[:len(chain)]:  # one extends the other: still a chain
                builder.add_chain(name, chain)
        tree = builder.build()
        return Engine._StepTree(tree.buffers, tree.tokens, tree.buffers.additive_mask(), tree)

    def _heads(self, hidden: np.ndarray, root: int) -> np.ndarray:
        """The heads' top-k [K,k] on one hidden state [1,H] whose next token is ``root``."""
        return self.backend.medusa_topk(hidden, np.array([root], dtype=np.int64))[0][:, 0]

    def _base_stats(self) -> dict[str, Any]:
        return {"prefill_ms": 0.0, "decode_tokens_per_s": 0.0, "new_tokens": 0, "reused_tokens": 0,
                "kv_capacity": self.cache.capacity, "kv_bytes": self.cache.nbytes,
                "steps": 0, "mean_accepted": 1.0}

    def _tuned_here(self, tuned_for: dict) -> bool:
        """Whether a tree `edgert tune-tree` tuned applies to this engine: measured on the same
        backend (a TVM verification row costs more than ONNX Runtime's: the fp32 tree tuned on
        ONNX Runtime is slower than the default there), verifying the same way (chains at
        int8 activations on ONNX Runtime, trees otherwise)."""
        return (tuned_for.get("backend", "ort") == self.backend_name
                and tuned_for.get("chains_only", self.verifies_chains) == self.verifies_chains)

    @property
    def verifies_chains(self) -> bool:
        """Whether verification takes chains only (int8 activations on ONNX Runtime, or a
        cache that cannot move a side branch's entries), not trees."""
        return self.row_exact or not self.cache.can_move_entries

    def set_draft_tree(self, params: DraftTreeParams) -> None:
        """How much the draft layer drafts per step: ``params`` shapes its dynamic tree, and
        its depth is also the chain's length where verification takes chains only."""
        self.draft_tree = params
        self.draft_depth = params.depth

    @property
    def default_speculative(self) -> str:
        """The decoding mode when a request names none: prompt lookup, with the draft layer
        when the artifact has one, else with the Medusa heads when it has them and their tree
        is not tuned to be slower than plain decoding. Measured on SmolLM2, chat/copy prompts,
        x plain greedy: fp32 draft+lookup 1.30x/1.55x against medusa+lookup 1.17x/1.48x
        (bench/results/speculative_draft_fp32.json); q4, the retrained draft, 1.26x/1.39x
        against 1.23x/1.36x, within the run's noise (speculative_draft_q4.json); before the draft
        layer, Medusa alone 1.22x/1.17x, lookup alone 1.18x/1.27x (speculative_q4.json)."""
        if self.has_draft:
            return "draft+lookup"
        return "medusa+lookup" if self.medusa_by_default else "lookup"

    def drafters_for(self, speculative: str | None = None, medusa: bool | None = None
                     ) -> tuple[str, ...]:
        """The drafters of a request: ``speculative`` ("off", "medusa", "lookup" or a
        combination such as "medusa+lookup"; None: ``medusa`` if given, else the artifact's
        default). GenerationError naming the choices otherwise."""
        if speculative is None:
            speculative = self.default_speculative if medusa is None else (
                "medusa" if medusa else "off")
        elif medusa is not None:
            raise GenerationError("pass speculative= or medusa=, not both (medusa=True is "
                                  "speculative='medusa', medusa=False is 'off')")
        if not isinstance(speculative, str) or not speculative:
            raise GenerationError(f"speculative must be a string such as 'medusa+lookup', got "
                                  f"{speculative!r}")
        if speculative == "off":
            return ()
        names = speculative.split("+")
        for name in names:
            if name not in DRAFTERS:
                raise GenerationError(f"unknown speculative mode '{name}'; choose off, medusa, "
                                      "draft, lookup, or a '+' combination such as "
                                      "draft+lookup")
            if name == "medusa" and not self.has_medusa:
                raise GenerationError("this artifact has no Medusa heads and tree; export it "
                                      "with heads, or decode without them (speculative='off' "
                                      "or 'lookup'; CLI: --no-medusa)")
            if name == "draft" and not self.has_draft:
                raise GenerationError(self._no_draft_reason())
        if len(set(names)) != len(names):
            raise GenerationError(f"speculative mode '{speculative}' names a drafter twice")
        return tuple(names)

    def _no_draft_reason(self) -> str:
        if self.manifest.draft is not None:  # the artifact has one; this backend's build not
            return (f"this artifact's {self.backend.name} build has no draft layer (the draft "
                    "graph for TVM, draft.portable.onnx, came with a later edgert): re-export "
                    "the artifact and re-run `edgert compile`, or use medusa and/or lookup")
        return ("this artifact has no draft layer; export it with one (`edgert train-draft`, "
                "then `edgert export --draft DIR`) or use medusa and/or lookup")

    def _options(self, max_new_tokens, temperature, top_p, top_k, seed, medusa, threshold,
                 alpha, ignore_eos=False, dhsa=None, speculative=None,
                 acceptance="rejection", json_schema=None) -> Engine._Options:
        params = SamplingParams(temperature, top_p, top_k, seed)
        for name, value in (("typical_threshold", threshold), ("typical_alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 <= value <= 1):
                raise GenerationError(f"{name} must be a number in [0, 1], got {value!r}")
        if acceptance not in ACCEPTANCE:
            raise GenerationError(f"unknown acceptance '{acceptance}'; choose "
                                  f"{' or '.join(ACCEPTANCE)}")
        if json_schema is not None:
            check_schema(json_schema)
            if speculative not in (None, "off") or medusa:
                raise GenerationError("structured output (json_schema) decodes without "
                                      "speculation; drop speculative/medusa")
            speculative, medusa = "off", None
        return Engine._Options(max_new_tokens, params, self.drafters_for(speculative, medusa),
                               threshold, alpha, ignore_eos, dhsa, acceptance=acceptance,
                               json_schema=json_schema)

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 chat: bool = True, medusa: bool | None = None,
                 typical_threshold: float = DEFAULT_TYPICAL_THRESHOLD,
                 typical_alpha: float = DEFAULT_TYPICAL_ALPHA,
                 ignore_eos: bool = False, dhsa: bool | None = None,
                 speculative: str | None = None, acceptance: str = "rejection",
                 json_schema: dict | None = None) -> Result:
        """Generate a completion. ``temperature=0`` is greedy; stops at EOS or the limit.

        ``speculative`` picks the drafters whose proposals each step verifies in one forward:
        "medusa" (the heads' tree), "lookup" (continuations copied from earlier text: prompt
        lookup), "draft" (the artifact's draft layer), a combination such as "draft+lookup"
        (their union), or "off". Default: ``medusa`` when given
        (True: "medusa", False: "off"), else :attr:`default_speculative` (lookup, plus the
        draft layer when the artifact has one, else Medusa
        when the artifact has heads whose tree is not tuned to be slower than plain
        decoding). Greedy acceptance at
        ``temperature=0`` (output identical to plain greedy). When sampling, ``acceptance``
        "rejection" (default) keeps the output distributed exactly as plain sampling with the
        same temperature, top_k and top_p; "typical" keeps a candidate when its probability
        exceeds ``min(typical_threshold, typical_alpha * exp(-entropy))`` and it survives
        top_k/top_p (more tokens per step, a different distribution). ``stats`` reports
        ``speculative``, ``steps``, ``mean_accepted`` and ``accepted_by`` (the accepted
        drafted tokens per drafter). ``ignore_eos`` keeps
        generating past EOS up to ``max_new_tokens`` (benchmarks, memory checks).
        ``dhsa`` (default: for prompts longer than the artifact's DHSA ``min_context``)
        prefills through dynamic hierarchical sparse attention; decoding stays dense.
        ``json_schema``: structured output, the reply is JSON that validates against the
        schema (``edgert.runtime.structured``: the structure forced, the values chosen by the
        model among the tokens that keep it valid; no speculation).

        Returns a :class:`Result` with ``prompt_ids``, ``output_ids`` (EOS included when it was
        produced), ``text`` (special tokens removed) and ``stats``.
        """
        opts = self._options(max_new_tokens, temperature, top_p, top_k, seed, medusa,
                             typical_threshold, typical_alpha, ignore_eos, dhsa, speculative,
                             acceptance, json_schema)
        prompt_ids = self.encode(prompt, chat)
        self._check_request(prompt_ids, max_new_tokens)
        stats = self._base_stats()
        output = list(self._generate_ids(prompt_ids, opts, stats))
        return Result(prompt_ids, output, self.tokenizer.decode(output), stats)

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               chat: bool = True, medusa: bool | None = None,
               typical_threshold: float = DEFAULT_TYPICAL_THRESHOLD,
               typical_alpha: float = DEFAULT_TYPICAL_ALPHA, dhsa: bool | None = None,
               stats: dict[str, Any] | None = None,
               speculative: str | None = None, acceptance: str = "rejection",
               json_schema: dict | None = None) -> Iterator[str]:
        """Like :meth:`generate`, but yields text pieces as tokens are decided.

        Pass a dict as ``stats`` to receive the statistics when the stream ends.
        """
        opts = self._options(max_new_tokens, temperature, top_p, top_k, seed, medusa,
                             typical_threshold, typical_alpha, dhsa=dhsa,
                             speculative=speculative, acceptance=acceptance,
                             json_schema=json_schema)
        prompt_ids = self.encode(prompt, chat)
        self._check_request(prompt_ids, max_new_tokens)
        stats = stats if stats is not None else {}
        stats.update(self._base_stats())
        detok = StreamDecoder(self.tokenizer)
        for token in self._generate_ids(prompt_ids, opts, stats):
            piece = detok.push(token)
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail


def _check_text(prompt) -> None:
    """A prompt's text must be encodable UTF-8 (a command line's undecodable bytes arrive as
    lone surrogates, which the tokenizer would reject with a TypeError)."""
    texts = [prompt] if isinstance(prompt, str) else [
        m.get("content") for m in prompt if isinstance(m, dict)] if isinstance(
        prompt, list) else []
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise GenerationError(f"the prompt is not valid UTF-8 text (byte "
                                      f"{exc.object[exc.start:exc.end]!r} at {exc.start}); "
                                      "pass UTF-8 text") from None


def load(path: str | Path, backend: str = "ort", device: str = "cpu", **kwargs) -> Engine:
    """Load an artifact directory: ``edgert.load("artifacts/smollm2-135m")``."""
    return Engine(path, backend=backend, device=device, **kwargs)
