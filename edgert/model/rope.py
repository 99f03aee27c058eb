"""Rotary embedding frequencies for the supported ``rope_scaling`` types."""

from __future__ import annotations

import math

import numpy as np

from edgert.model.config import DecoderConfig


def _llama3_scale(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling: long wavelengths scaled, short kept."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    low_wavelen = original / low
    high_wavelen = original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def inverse_frequencies(config: DecoderConfig) -> np.ndarray:
    """``inv_freq`` of shape [head_dim // 2], float64, with the config's scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rope_type = config.rope_type
    if rope_type == "linear":
        inv_freq = inv_freq / float(config.rope_scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    elif rope_type == "frequency_factors":  # GGUF's rope_freqs tensor: one divisor per pair
        inv_freq = inv_freq / np.asarray(config.rope_scaling["factors"], dtype=np.float64)
    return inv_freq
