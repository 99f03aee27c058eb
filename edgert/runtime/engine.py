"""The Engine apps embed: load an artifact once, then generate or stream text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact import load_manifest
from edgert.errors import CapacityError, GenerationError
from edgert.runtime.backends import create_backend
from edgert.runtime.kv_cache import KVCache
from edgert.runtime.sampling import SamplingParams, select_token
from edgert.runtime.steps import decode_one, prefill
from edgert.runtime.tokenizer import Messages, StreamDecoder, Tokenizer

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
    backend : ``"ort"`` (ONNX Runtime).
    device : ``"cpu"`` or ``"cuda"``.
    threads : intra-op threads (0 = ONNX Runtime's default: the physical cores).
    verify : check the SHA-256 of every artifact file at load.
    """

    def __init__(self, path: str | Path, backend: str = "ort", device: str = "cpu",
                 threads: int = 0, verify: bool = True,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.path = Path(path)
        self.manifest = load_manifest(self.path, verify=verify)
        self.tokenizer = Tokenizer(self.path, self.manifest.tokenizer)
        self.cache = KVCache(self.manifest.kv_cache)
        self.backend = create_backend(backend, self.path, self.manifest, self.cache, device,
                                      threads)
        self.prefill_chunk = prefill_chunk
        self.eos_ids = set(self.manifest.tokenizer.eos_token_ids)

    # -- prompt handling ------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
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
    def _generate_ids(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                      stats: dict[str, Any]) -> Iterator[int]:
        """Prefill then plain decode; yields each new token id; fills ``stats`` as it goes."""
        rng = np.random.default_rng(params.seed)
        self.cache.reset()
        t0 = time.perf_counter()
        out = prefill(self.backend, self.cache, prompt_ids, self.prefill_chunk)
        t1 = time.perf_counter()
        stats["prefill_ms"] = (t1 - t0) * 1e3
        new = 0
        token = select_token(out.logits[-1], params, rng)
        while True:
            new += 1
            stats["new_tokens"] = new
            yield token
            if token in self.eos_ids or new >= max_new_tokens:
                break
            out = decode_one(self.backend, self.cache, token)
            token = select_token(out.logits[-1], params, rng)
        elapsed = time.perf_counter() - t1
        # the first token comes from prefill; the rest each took one decode forward
        stats["decode_tokens_per_s"] = (new - 1) / elapsed if new > 1 and elapsed > 0 else 0.0

    def _base_stats(self) -> dict[str, Any]:
        return {"prefill_ms": 0.0, "decode_tokens_per_s": 0.0, "new_tokens": 0,
                "kv_capacity": self.cache.capacity, "kv_bytes": self.cache.nbytes}

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 chat: bool = True) -> Result:
        """Generate a completion. ``temperature=0`` is greedy; stops at EOS or the limit.

        Returns a :class:`Result` with ``prompt_ids``, ``output_ids`` (EOS included when it was
        produced), ``text`` (special tokens removed) and ``stats``.
        """
        params = SamplingParams(temperature, top_p, top_k, seed)
        prompt_ids = self.encode(prompt, chat)
        self._check_request(prompt_ids, max_new_tokens)
        stats = self._base_stats()
        output = list(self._generate_ids(prompt_ids, max_new_tokens, params, stats))
        return Result(prompt_ids, output, self.tokenizer.decode(output), stats)

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               chat: bool = True, stats: dict[str, Any] | None = None) -> Iterator[str]:
        """Like :meth:`generate`, but yields text pieces as tokens are decided.

        Pass a dict as ``stats`` to receive the statistics when the stream ends.
        """
        params = SamplingParams(temperature, top_p, top_k, seed)
        prompt_ids = self.encode(prompt, chat)
        self._check_request(prompt_ids, max_new_tokens)
        stats = stats if stats is not None else {}
        stats.update(self._base_stats())
        detok = StreamDecoder(self.tokenizer)
        for token in self._generate_ids(prompt_ids, max_new_tokens, params, stats):
            piece = detok.push(token)
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail


def load(path: str | Path, backend: str = "ort", device: str = "cpu", **kwargs) -> Engine:
    """Load an artifact directory: ``edgert.load("artifacts/smollm2-135m")``."""
    return Engine(path, backend=backend, device=device, **kwargs)
