"""Prompt lookup: candidates copied from earlier text (no model, no training).

When the last n tokens of the text so far (prompt and output) occurred earlier, the tokens that
followed that earlier occurrence are a good guess for what follows now: summaries, edits, code
and quotes repeat their input. :class:`PromptLookup` keeps, for every n-gram size from
``max_ngram`` down to ``min_ngram``, where each n-gram last occurred *with a continuation*, so
a proposal is a dictionary lookup per size, longest n-gram first, the most recent occurrence
winning. The index grows with the text as it is extended (O(max_ngram) per token).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LookupParams:
    max_ngram: int = 3  # the longest suffix matched
    # the shortest: a single repeated token predicts too little (bench.speculative on
    # SmolLM2 int8, 10 prompts per set: min 1 -> 0.91x/1.17x plain on chat/copy with Medusa,
    # min 2 -> 1.25x/1.33x)
    min_ngram: int = 2
    num_tokens: int = 8  # candidates proposed after a match

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and "
                             f"{self.max_ngram}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be positive, got {self.num_tokens}")


class PromptLookup:
    """The n-gram index of one sequence (see the module docstring)."""

    def __init__(self, params: LookupParams | None = None) -> None:
        self.params = params or LookupParams()
        self.text: list[int] = []
        # n -> {n-gram: start of the tokens that followed its latest occurrence}
        self.index: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(self.params.min_ngram, self.params.max_ngram + 1)}

    def reset(self, ids: list[int]) -> None:
        self.text = []
        for table in self.index.values():
            table.clear()
        self.extend(ids)

    def extend(self, ids) -> None:
        """Append tokens; every n-gram that now has a continuation is indexed."""
        for token in ids:
            end = len(self.text)  # the n-grams ending just before this token are followed by it
            for n, table in self.index.items():
                if end >= n:
                    table[tuple(self.text[end - n:end])] = end
            self.text.append(int(token))

    def propose(self) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the longest matching
        suffix; [] when no suffix occurred before."""
        end = len(self.text)
        for n in range(self.params.max_ngram, self.params.min_ngram - 1, -1):
            if end < n:
                continue
            start = self.index[n].get(tuple(self.text[end - n:]))
            if start is not None:
                return self.text[start:start + self.params.num_tokens]
        return []
