"""Rotary position embeddings with the Hugging Face conventions (rotate_half layout; default, linear, llama3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoelora.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """(head_dim // 2,) inverse frequencies, scaled as `config.rope_type` says (transformers' modeling_rope_utils)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    params = dict(config.rope_scaling)
    if config.rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif config.rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(positions_bt: jax.Array, inv_freq_h: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape (batch, time, head_dim), computed in fp32 and cast to `dtype`."""
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
    emb_btd = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return jnp.cos(emb_btd).astype(dtype), jnp.sin(emb_btd).astype(dtype)


def apply_rope(x_btnd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    half = x_btnd.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnd[..., half:], x_btnd[..., :half]], axis=-1)
    return x_btnd * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
