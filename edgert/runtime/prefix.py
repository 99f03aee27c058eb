"""Prefix reuse (llama.cpp's ``cache_prompt``): a prompt that starts with tokens whose K/V the
cache already holds (the same system prompt, the next turn of a chat) prefills only the rest.

The cached entries are kept as they are: a reused prefix is exactly what a fresh prefill
would compute up to rounding (rows computed in other chunks or steps; near-ties aside, the
same tokens at fp32; with int8 activations the differences are the ~0.5-logit ones of any
other row split). The last prompt token is always run again: its logits choose the first new
token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def common_prefix(cached: Sequence[int] | np.ndarray, prompt: Sequence[int] | np.ndarray
                  ) -> int:
    """The number of leading tokens ``cached`` and ``prompt`` share."""
    n = min(len(cached), len(prompt))
    if n == 0:
        return 0
    a = np.asarray(cached[:n], dtype=np.int64)
    b = np.asarray(prompt[:n], dtype=np.int64)
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if len(differ) else n


def reusable_prefix(cached: Sequence[int] | np.ndarray, prompt: Sequence[int] | np.ndarray
                    ) -> int:
    """How many of ``prompt``'s tokens can be taken from the cache: the shared prefix, less
    the prompt's last token (run again for its logits)."""
    return max(0, min(common_prefix(cached, prompt), len(prompt) - 1))
