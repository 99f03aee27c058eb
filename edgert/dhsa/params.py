"""DHSA parameters (stored in the artifact manifest under ``dhsa``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgert.artifact.manifest import strict_fields
from edgert.errors import ConfigError

# the boundary rule's mass ratio is (max + eps) / (min + eps): reference, graph and kernel
BOUNDARY_EPS = 1e-6


@dataclass(frozen=True)
class DHSAParams:
    """Prefill sparse-attention settings.

    block_size: query block length; each block selects its keys once.
    budget: keys each query block attends to (local + sinks + top-scoring).
    local: the most recent allowed keys every block keeps (with block_size=local: the block).
    sink: the first keys of the sequence every block keeps.
    dense_tail: the last queries (the instruction) attend densely to everything before them.
    boundary_window, boundary_threshold, nms_radius: the training-free chunk-boundary rule
        (attention-mass ratio left/right of a position over ``boundary_window`` keys, kept when
        >= threshold, non-max suppressed within +-nms_radius).
    probe_stride: probe queries for that rule: every probe_stride-th token plus the dense tail.
    boundary_layer: the layer whose attention places the boundaries (shared by all layers).
    fixed_chunk: 0 = dynamic boundaries; N > 0 = fixed N-token chunks (the baseline).
    min_context: prompts longer than this prefill through DHSA (shorter ones densely; at 2K
        tokens DHSA is no faster than dense prefill on SmolLM2, docs/dhsa.md).
    prefill_chunk: query tokens per prefill call (0: the whole prompt in one call). A call
        sees only the tokens up to its end, like chunked prefill against the cache, so the
        peak memory is sized by the chunk, not the prompt. A multiple of block_size, and only
        with local >= block_size.
    per_kv_head: 1 = each KV head selects its own keys (scored with its query heads
        averaged); 0 = one selection for all heads (all heads averaged).
    early_layers, early_budget: the first ``early_layers`` sparse layers (from
        boundary_layer on) select ``early_budget`` keys per block instead of ``budget``
        (no effect with early_layers 0 or early_budget <= budget). The earliest layers'
        sparse attention costs the most accuracy; a wider budget there costs less latency
        than dense layers (docs/dhsa.md).
    center_keys: 1 = chunks are scored on keys centred on the mean key of the call
        (``(sum(k) - len * mean_k) / sqrt(len)``). Softmax ignores a shift common to a
        query's scores, so the centring changes no attention weight, but it removes a bias
        towards long chunks: keys share a common direction (most in the later layers), which
        the uncentred ``mean * sqrt(len)`` scales by sqrt(len). 0 = the paper's form as is.
    """

    block_size: int = 128
    budget: int = 1024
    local: int = 256
    sink: int = 64
    dense_tail: int = 64
    boundary_window: int = 4
    boundary_threshold: float = 1.5
    nms_radius: int = 4
    probe_stride: int = 64
    boundary_layer: int = 0
    fixed_chunk: int = 0
    min_context: int = 2048
    prefill_chunk: int = 768
    per_kv_head: int = 0
    early_layers: int = 8
    early_budget: int = 2048
    center_keys: int = 1

    def __post_init__(self) -> None:
        for name in ("block_size", "budget", "local", "boundary_window", "nms_radius",
                     "probe_stride", "min_context"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dhsa.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sink", "dense_tail", "fixed_chunk", "boundary_layer", "prefill_chunk",
                     "early_layers", "early_budget"):
            if getattr(self, name) < 0:
                raise ConfigError(f"dhsa.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("per_kv_head", "center_keys"):
            if getattr(self, name) not in (0, 1):
                raise ConfigError(f"dhsa.{name} is 0 or 1, got {getattr(self, name)}")
        if self.local + self.sink > self.budget:
            raise ConfigError(f"dhsa.local + dhsa.sink ({self.local + self.sink}) must not "
                              f"exceed dhsa.budget ({self.budget})")
        if self.min_context < self.budget:
            raise ConfigError(f"dhsa.min_context ({self.min_context}) must be >= dhsa.budget "
                              f"({self.budget}): shorter prompts are cheaper dense")
        if self.prefill_chunk:
            self._check_prefill_chunk()

    def is_early(self, layer: int) -> bool:
        """Whether ``layer`` is one of the sparse layers that select ``early_budget`` keys
        (none when early_budget is not above budget)."""
        start = self.boundary_layer
        return self.early_budget > self.budget and start <= layer < start + self.early_layers

    def for_layer(self, layer: int) -> DHSAParams:
        """The settings layer ``layer`` computes with: its own budget as ``budget``."""
        if not self.is_early(layer):
            return self
        return dataclasses.replace(self, budget=self.early_budget, early_layers=0,
                                   early_budget=0,
                                   min_context=max(self.min_context, self.early_budget))

    def _check_prefill_chunk(self) -> None:
        chunk = self.prefill_chunk
        if chunk % self.block_size:
            raise ConfigError(f"dhsa.prefill_chunk ({chunk}) must be a multiple of "
                              f"dhsa.block_size ({self.block_size}); or 0 for the whole "
                              "prompt in one call")
        if self.local < self.block_size:
            raise ConfigError(f"dhsa.prefill_chunk needs dhsa.local >= dhsa.block_size "
                              f"({self.local} < {self.block_size}); set prefill_chunk to 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_settings(cls, settings: tuple[str, ...] | list[str]) -> DHSAParams:
        """The defaults with ``KEY=VALUE`` overrides (the CLI's ``--dhsa``)."""
        return cls().with_settings(settings)

    def with_settings(self, settings: tuple[str, ...] | list[str]) -> DHSAParams:
        """These settings with ``KEY=VALUE`` overrides."""
        kinds = {f.name: float if f.type in (float, "float") else int
                 for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for item in settings:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in kinds:
                raise ConfigError(f"--dhsa takes KEY=VALUE with KEY one of "
                                  f"{', '.join(kinds)}; got {item!r}")
            try:
                values[key] = kinds[key](raw)
            except ValueError:
                raise ConfigError(f"--dhsa {key} needs a{'' if kinds[key] is int else ' real'} "
                                  f"number, got {raw!r}") from None
        return dataclasses.replace(self, **values)

    @classmethod
    def from_manifest(cls, manifest) -> DHSAParams | None:
        """An artifact's DHSA settings (``manifest.dhsa``), None when it has no DHSA graph."""
        return cls.from_dict(manifest.dhsa) if manifest.dhsa else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DHSAParams:
        """A manifest's settings. One written before ``early_layers`` or ``center_keys``
        existed was exported with every layer at ``budget`` and uncentred keys: it reads as
        early_layers 0 and center_keys 0, not today's defaults."""
        data = strict_fields(cls, data, "dhsa.")  # a dict of known fields, each an int/float
        return cls(**{"early_layers": 0, "early_budget": 0, "center_keys": 0, **data})


def prefill_calls(seq_len: int, params: DHSAParams) -> list[tuple[int, int]]:
    """[(start, end)] of the prefill calls: ``prefill_chunk`` query tokens each (0: one call);
    a last call shorter than the dense tail is merged into the one before it, so the
    instruction is never split."""
    chunk = params.prefill_chunk
    if not chunk or seq_len <= chunk:
        return [(0, seq_len)]
    ends = [*range(chunk, seq_len, chunk), seq_len]
    if ends[-1] - ends[-2] < max(params.dense_tail, 1):
        del ends[-2]
    return list(zip([0, *ends[:-1]], ends))
