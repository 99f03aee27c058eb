"""Parallel sequence slots: several sequences decoding together over the one fixed KV cache.

Decoding is memory-bandwidth bound: a forward of four rows reads the weights once, as a
forward of one row does, so S sequences advance together at little more than the cost of
one: each step is one forward holding one row per decoding sequence, plus chunks of the
prompts still being read (chunked prefill: a new request joins without stalling the others).

The sequences share the cache as one timeline. Every forward appends its rows at
``[length, length + q)``; a sequence owns the entries of its own tokens, and a whole-cache
bias (the ORT graph's ``tree_mask`` given as ``[q, length + q]``) lets each row attend only
to those and to its own earlier rows. A finished or cancelled sequence leaves holes, which
every row's attention still reads (masked): when the next step does not fit, or the holes
outnumber the live entries (plus ``COMPACT_SLACK``), the live entries move to the front (one
gather per buffer). Admission
reserves each sequence's prompt + ``max_new_tokens``, so a compaction always makes room.
Memory stays what the artifact allocated at load: no per-slot cache.

A greedy sequence decoding alone (the others finished, none waiting) gets speculative steps,
as a single-slot engine does: the artifact's drafters but the draft layer (prompt lookup, the
Medusa heads on its last hidden state) propose, one forward verifies, the accepted path is
committed (``speculative``; sampled sequences stay plain, so that a seed gives the same text
whatever else runs).

Prefix reuse (``prefix_reuse=True``): entries are never written twice, so sequences can share
them. A joining sequence whose prompt starts with the tokens of a running sequence, or of one
that finished since the last compaction (the same system prompt, the next turn of a chat),
takes that prefix's entries as its own and prefills only the rest (``BatchSequence.reused``).

:class:`BatchDecoder` is the synchronous core (``step()`` runs one forward);
:class:`BatchWorker` runs it on a thread for a server, with callbacks per token.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgert.artifact.manifest import WHOLE_BIAS_AXIS, GraphKey
from edgert.errors import CapacityError, GenerationError
from edgert.runtime.backends import StepInputs
from edgert.runtime.kv_cache import KVCache
from edgert.runtime.prefix import reusable_prefix
from edgert.runtime.sampling import SamplingParams, select_token
from edgert.runtime.speculative import (
    DEFAULT_TYPICAL_ALPHA,
    DEFAULT_TYPICAL_THRESHOLD,
    accept,
)
from edgert.runtime.steps import MASK_VALUE
from edgert.runtime.structured import JsonPolicy
from edgert.speculative.lookup import LookupParams, PromptLookup

DEFAULT_PREFILL_BUDGET = 256  # prompt tokens per step, over all joining sequences
COMPACT_SLACK = 256  # holes tolerated in the timeline before compacting (beyond the live)


@dataclass(eq=False)
class BatchSequence:
    """One request in the batch: its prompt, limits and sampling, and its progress.

    ``on_token(token)`` and ``on_end(finish_reason)`` are called from the thread that runs
    :meth:`BatchDecoder.step` (finish reasons: "stop" at EOS, "length", "cancelled")."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False
    on_token: Callable[[int], None] = lambda token: None
    on_end: Callable[[str], None] = lambda reason: None
    policy: JsonPolicy | None = None  # structured output: chooses (and forces) its tokens
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    fed_entries: int = 0  # how many cache entries it holds (``entries``)
    fed: int = 0  # prompt tokens already in the cache
    out_fed: int = 0  # output tokens already in the cache
    reused: int = 0  # prompt tokens whose entries it took from another sequence
    last_hidden: np.ndarray | None = None  # [1,H] after its last fed token (Medusa heads)
    speculative_steps: int = 0  # speculative steps run for it (decoding alone)
    drafted_accepted: int = 0  # drafted tokens those steps accepted

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise GenerationError("the prompt encodes to no tokens; pass some text")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got "
                                  f"{self.max_new_tokens!r}")
        self.rng = np.random.default_rng(self.params.seed)
        # the cache indices of its fed tokens, allocated once (it never holds more)
        self._entries = np.empty(self.reserved, dtype=np.int64)

    @property
    def entries(self) -> np.ndarray:
        """Cache indices of its fed tokens, in order (a view: compaction rewrites them)."""
        return self._entries[:self.fed_entries]

    def add_entries(self, start: int, count: int) -> None:
        self._entries[self.fed_entries:self.fed_entries + count] = np.arange(start, start + count)
        self.fed_entries += count

    def fed_tokens(self) -> np.ndarray:
        """The tokens of its entries, in order (prompt, then output)."""
        return np.array([*self.prompt_ids[:self.fed], *self.output[:self.out_fed]],
                        dtype=np.int64)

    def reuse(self, entries: np.ndarray) -> None:
        """Take ``entries`` (another sequence's, holding this prompt's first tokens) as the
        start of its own: those prompt tokens count as fed."""
        count = len(entries)
        if self.fed_entries or count >= len(self.prompt_ids):
            raise ValueError("reuse needs a fresh sequence and a prefix shorter than its prompt")
        self._entries[:count] = entries
        self.fed_entries = self.fed = self.reused = count

    @property
    def reserved(self) -> int:
        """Cache entries this sequence may come to hold (output past ``max_new_tokens`` is
        never emitted, so never fed)."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_rows(self, budget: int) -> tuple[list[int], int, bool]:
        """(tokens to feed, position of the first, whether the last row's logits pick the
        next token) for the next step; ``budget``: prompt tokens this step may still take."""
        if self.fed < len(self.prompt_ids):
            take = min(len(self.prompt_ids) - self.fed, budget)
            tokens = self.prompt_ids[self.fed:self.fed + take]
            return tokens, self.fed, self.fed + take == len(self.prompt_ids)
        return self.output[self.out_fed:], len(self.prompt_ids) + self.out_fed, True


@dataclass
class _Rows:
    """The rows one sequence contributes to a step."""

    seq: BatchSequence
    start: int  # first row in the step
    tokens: list[int]
    position: int  # of its first token in the sequence
    samples: bool  # its last row's logits choose its next token


def supports_batching(engine) -> str | None:
    """None when ``engine`` can run parallel slots, else why not (one line, with the fix)."""
    if engine.backend_name != "ort" or not isinstance(engine.cache, KVCache):
        return ("parallel slots run on the ONNX Runtime backend with the cache in host memory "
                f"(this engine: {engine.backend_name} on {engine.device})")
    graph = engine.manifest.graphs.get(GraphKey.ORT_GQA)
    mask = next((t for t in graph.inputs if t.name == "tree_mask"), None) if graph else None
    if mask is None or mask.shape[-1] != WHOLE_BIAS_AXIS:
        return ("this artifact's ONNX Runtime graph takes no whole-cache attention bias "
                "(exported by an older edgert); re-export it for parallel slots")
    return None


class BatchDecoder:
    """Up to ``slots`` sequences decoded together; :meth:`step` runs one forward."""

    def __init__(self, engine, slots: int,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET, prefix_reuse: bool = False,
                 speculative: str | None = None) -> None:
        """``speculative``: the drafters of a greedy sequence decoding alone (None: the
        engine's default; "off": none); the draft layer is left out (its cache follows one
        sequence)."""
        reason = supports_batching(engine)
        if reason is not None:
            raise GenerationError(reason)
        if slots < 1 or prefill_budget < 1:
            raise GenerationError(f"slots and prefill_budget must be >= 1, got {slots}, "
                                  f"{prefill_budget}")
        self.engine, self.slots, self.prefill_budget = engine, slots, prefill_budget
        self.backend, self.cache = engine.backend, engine.cache
        self.active: list[BatchSequence] = []
        self.compactions = 0
        self.prefix_reuse = prefix_reuse
        names = [name for name in engine.drafters_for(speculative) if name != "draft"]
        if speculative is None and engine.has_draft and engine.has_medusa:
            names.insert(0, "medusa")  # the heads stand in for the draft layer
        self.drafters = tuple(names)
        # the prompt-lookup index of the sequence that last decoded alone, and its length
        self._lookup_of: tuple[BatchSequence, PromptLookup, int] | None = None
        # finished sequences' (tokens, entries), newest last: prefixes a joining sequence may
        # reuse until a compaction or a restart of the timeline drops their entries
        self._retained: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=max(slots, 4))
        # the step's whole-cache bias [rows, past + rows], a contiguous view of one buffer
        # allocated at start (the prefill budget, a row per slot and the pad row; grown only
        # for a step with more rows, when structured output forces a piece)
        self._bias = np.empty((prefill_budget + slots + 1) * self.cache.capacity,
                              dtype=np.float32)

    @property
    def reserved(self) -> int:
        return sum(seq.reserved for seq in self.active)

    def check(self, seq: BatchSequence) -> None:
        """Refuse a sequence that could never fit, whatever else runs."""
        if seq.reserved > self.cache.capacity:
            raise CapacityError(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_new_tokens "
                f"({seq.max_new_tokens}) = {seq.reserved} exceeds the KV capacity "
                f"{self.cache.capacity}; lower max_new_tokens or shorten the prompt")

    def can_admit(self, seq: BatchSequence) -> bool:
        return (len(self.active) < self.slots
                and self.reserved + seq.reserved <= self.cache.capacity)

    def admit(self, seq: BatchSequence) -> None:
        self.check(seq)
        if not self.can_admit(seq):
            raise GenerationError("no free slot or cache room for this sequence; wait for one "
                                  "to finish (can_admit)")
        donor = self._best_prefix(seq) if self.prefix_reuse else None
        if donor is not None:
            seq.reuse(donor)
        elif not self.active:
            self.cache.reset()  # nothing live or reusable: start the timeline over
            self._retained.clear()
        self.active.append(seq)

    def _best_prefix(self, seq: BatchSequence) -> np.ndarray | None:
        """The longest reusable prefix of ``seq``'s prompt among the running and the retained
        sequences: its entries, or None."""
        best, best_len = None, 0
        candidates = [(s.fed_tokens(), s.entries) for s in self.active]
        for tokens, entries in [*candidates, *reversed(self._retained)]:
            n = reusable_prefix(tokens, seq.prompt_ids)
            if n > best_len:
                best, best_len = entries[:n].copy(), n
        return best

    def _retire(self, seq: BatchSequence) -> None:
        """``seq`` left the batch: keep its prefix for later requests."""
        if self.prefix_reuse and seq.fed_entries:
            self._retained.append((seq.fed_tokens(), seq.entries.copy()))

    def cancel(self, seq: BatchSequence) -> None:
        """Drop ``seq`` (its entries become holes); ``on_end("cancelled")`` if still running."""
        if seq in self.active:
            self.active.remove(seq)
            self._retire(seq)
            if not seq.done:
                seq.finish_reason = "cancelled"
                seq.on_end("cancelled")

    def step(self) -> list[tuple[BatchSequence, int]]:
        """One forward over every active sequence's next rows; returns the tokens it chose
        (sequence, token), after calling their callbacks. Finished sequences leave."""
        solo = self._decoding_alone()
        if solo is not None:
            chosen = self._speculative_step(solo)
            if chosen is not None:
                return chosen
        plan = self._plan()
        if not plan:
            return []
        q = sum(len(rows.tokens) for rows in plan)
        # int8-activation artifacts whose graph does not pad a lone row's attention itself:
        # a lone row runs as two (see steps.decode_one), so a sequence decoding alone gets
        # the tokens Engine.generate gets
        pad = q == 1 and self.engine.decode_rows == 2
        if self._should_compact(q + pad):
            self._compact()
        pad = pad and self.cache.length + 2 <= self.cache.capacity
        past = self.cache.length
        inputs, rows_out = self._inputs(plan, q, past, pad)
        out = self.backend.forward(inputs)
        self.cache.advance(q)
        for rows in plan:
            rows.seq.add_entries(past + rows.start, len(rows.tokens))
            if rows.seq.fed < len(rows.seq.prompt_ids):
                rows.seq.fed += len(rows.tokens)
            else:
                rows.seq.out_fed += len(rows.tokens)
        chosen = []
        for number, (rows, logits) in enumerate(zip(rows_out, out.logits)):
            seq = rows.seq
            seq.last_hidden = out.hidden[number:number + 1]
            if seq.policy is None:
                tokens = [select_token(logits, seq.params, seq.rng)]
            else:
                tokens = seq.policy.step(logits, seq.params, seq.rng)
            for token in tokens:
                if seq.done:
                    break
                chosen.append((seq, token))
                self._emit(seq, token)
            if seq.policy is not None and seq.policy.done and not seq.done:
                seq.finish_reason = "stop"  # the JSON is complete
                seq.on_end("stop")
        for seq in self.active:
            if seq.done:
                self._retire(seq)
        self.active = [seq for seq in self.active if not seq.done]
        return chosen

    def _decoding_alone(self) -> BatchSequence | None:
        """The one active sequence when it can take a speculative step: greedy, no structured
        output, its prompt read and every output token but the last in the cache."""
        if not self.drafters or len(self.active) != 1:
            return None
        seq = self.active[0]
        if (seq.policy is not None or not seq.params.greedy or seq.fed < len(seq.prompt_ids)
                or not seq.output or seq.out_fed != len(seq.output) - 1):
            return None
        return seq

    def _lookup(self, seq: BatchSequence) -> PromptLookup:
        """``seq``'s prompt-lookup index, brought up to its current text."""
        length = len(seq.prompt_ids) + len(seq.output)
        if self._lookup_of is not None and self._lookup_of[0] is seq:
            _, index, known = self._lookup_of  # only the new tokens: no copy of the text
            index.extend(seq.output[known - len(seq.prompt_ids):])
        else:  # it starts decoding alone: index its whole text once
            index = PromptLookup(LookupParams())
            index.reset([*seq.prompt_ids, *seq.output])
        self._lookup_of = (seq, index, length)
        return index

    def _speculative_step(self, seq: BatchSequence) -> list[tuple[BatchSequence, int]] | None:
        """One verification forward for ``seq`` (decoding alone) over what the drafters
        propose; None when they propose nothing or the tree does not fit (a plain step)."""
        engine, root = self.engine, seq.output[-1]
        head_ids = (engine._heads(seq.last_hidden, root)
                    if "medusa" in self.drafters and seq.last_hidden is not None else None)
        lookup = self._lookup(seq) if "lookup" in self.drafters else None
        if head_ids is None and lookup is None:
            return None
        tree = engine._step_tree(root, head_ids, lookup)
        if tree is None:
            return None
        q = tree.size
        if self._should_compact(q):
            self._compact()
        if self.cache.length + q > self.cache.capacity:
            return None
        past = self.cache.length
        position = len(seq.prompt_ids) + seq.out_fed  # the root's
        size = q * (past + q)
        if size > self._bias.size:
            self._bias = np.empty(size, dtype=np.float32)
        bias = self._bias[:size].reshape(q, past + q)
        bias.fill(MASK_VALUE)
        bias[:, seq.entries] = 0.0
        bias[:, past:] = tree.mask[0, 0]
        out = self.backend.forward(StepInputs(
            tree.tokens[None], (position + tree.buffers.depths)[None], bias[None, None],
            np.arange(q, dtype=np.int64), past, tree.buffers.parents))
        acc = accept(tree.buffers, tree.tokens, out.logits, seq.params, seq.rng,
                     DEFAULT_TYPICAL_THRESHOLD, DEFAULT_TYPICAL_ALPHA)
        self.cache.commit_path(acc.nodes)
        seq.add_entries(past, len(acc.nodes))
        seq.out_fed += len(acc.nodes)
        seq.last_hidden = out.hidden[acc.nodes[-1]:acc.nodes[-1] + 1]
        seq.speculative_steps += 1
        seq.drafted_accepted += len(acc.nodes) - 1
        chosen = []
        for token in [*tree.tokens[acc.nodes[1:]].tolist(), acc.next_token]:
            if seq.done:
                break
            chosen.append((seq, token))
            self._emit(seq, token)
        if seq.done:
            self.active.remove(seq)
            self._retire(seq)
        return chosen

    def _plan(self) -> list[_Rows]:
        plan, start, budget = [], 0, self.prefill_budget
        for seq in self.active:
            tokens, position, samples = seq.next_rows(budget)
            if not tokens:
                continue  # a prompt waiting for prefill budget
            if seq.fed < len(seq.prompt_ids):
                budget -= len(tokens)
            plan.append(_Rows(seq, start, tokens, position, samples))
            start += len(tokens)
        return plan

    def _inputs(self, plan: list[_Rows], q: int, past: int, pad: bool
                ) -> tuple[StepInputs, list[_Rows]]:
        """The step's inputs; ``pad`` adds an uncommitted copy of a lone row."""
        width = q + pad
        ids = np.empty(width, dtype=np.int64)
        positions = np.empty(width, dtype=np.int64)
        size = width * (past + width)
        if size > self._bias.size:  # forced structured-output pieces: more rows than slots
            self._bias = np.empty(size, dtype=np.float32)
        bias = self._bias[:size].reshape(width, past + width)
        bias.fill(MASK_VALUE)
        logits_rows, sampled = [], []
        for rows in plan:
            n = len(rows.tokens)
            block = slice(rows.start, rows.start + n)
            ids[block] = rows.tokens
            positions[block] = np.arange(rows.position, rows.position + n)
            if rows.seq.fed_entries:
                bias[block, rows.seq.entries] = 0.0
            own = np.triu(np.full((n, n), MASK_VALUE, dtype=np.float32), k=1)
            bias[block, past + rows.start:past + rows.start + n] = own
            if rows.samples:
                logits_rows.append(rows.start + n - 1)
                sampled.append(rows)
        if pad:
            ids[1], positions[1] = ids[0], positions[0] + 1
            bias[1] = bias[0]
            bias[1, past + 1] = 0.0
        return StepInputs(ids[None], positions[None], bias[None, None],
                          np.array(logits_rows, dtype=np.int64), past), sampled

    def _emit(self, seq: BatchSequence, token: int) -> None:
        seq.output.append(token)
        seq.on_token(token)
        if token in self.engine.eos_ids and not seq.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        if seq.done:
            seq.on_end(seq.finish_reason)

    def _should_compact(self, q: int) -> bool:
        """Compact when the step does not fit, or when finished sequences' entries (holes)
        outnumber the live ones by more than ``COMPACT_SLACK``: every row attends over the
        whole timeline, holes included, so they cost time on every step until removed."""
        if self.cache.length + q > self.cache.capacity:
            return True
        live = sum(len(seq.entries) for seq in self.active)
        return self.cache.length - live > max(live, COMPACT_SLACK)

    def _compact(self) -> None:
        """Move every live entry to the front of the cache, in timeline order (an entry that
        sequences share, a reused prefix, moves once); retained prefixes are dropped."""
        keep = np.unique(np.concatenate([seq.entries for seq in self.active]
                                        or [np.empty(0, dtype=np.int64)]))
        self.cache.compact(keep)
        for seq in self.active:
            seq.entries[:] = np.searchsorted(keep, seq.entries)
        self._retained.clear()
        self.compactions += 1


class BatchWorker:
    """A thread that admits submitted sequences (first come, first served) and steps the
    :class:`BatchDecoder` while any is active. It holds the engine's slot while it works,
    so a direct ``Engine.generate`` from another thread waits instead of sharing the cache."""

    def __init__(self, engine, slots: int,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET, prefix_reuse: bool = False,
                 speculative: str | None = None) -> None:
        self.decoder = BatchDecoder(engine, slots, prefill_budget, prefix_reuse, speculative)
        self.engine = engine
        self._waiting: deque[BatchSequence] = deque()
        self._cancelled: set[int] = set()
        self._wake = threading.Condition()
        self._stopped = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="edgert-batch")
        self._thread.start()

    @property
    def busy(self) -> int:
        return len(self.decoder.active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, seq: BatchSequence) -> None:
        self.decoder.check(seq)
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()

    def cancel(self, seq: BatchSequence) -> None:
        """Stop ``seq`` before its next step (its slot frees at once)."""
        with self._wake:
            self._cancelled.add(id(seq))
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self.decoder.active:
                    self._wake.wait()
                if self._stopped:
                    return
            with self.engine.slot.hold():
                while self._work_once():
                    pass

    def _work_once(self) -> bool:
        """Cancel, admit, step; False when nothing is left to do."""
        with self._wake:
            for seq in [s for s in self._waiting if id(s) in self._cancelled]:
                self._waiting.remove(seq)
                seq.finish_reason = "cancelled"
                seq.on_end("cancelled")
            for seq in list(self.decoder.active):
                if id(seq) in self._cancelled:
                    self.decoder.cancel(seq)
            self._cancelled.clear()
            while self._waiting and self.decoder.can_admit(self._waiting[0]):
                self.decoder.admit(self._waiting.popleft())
            if not self.decoder.active:
                return False
        try:
            self.decoder.step()
        except Exception as exc:  # a failed forward ends every active request, with why
            for seq in list(self.decoder.active):
                seq.finish_reason = "error"
                try:
                    seq.on_end(f"error: {exc}")
                except Exception:  # noqa: BLE001 (one caller's failure ends only its request)
                    pass
            self.decoder.active.clear()
        self.steps += 1
        return True
