"""SLIM's dynamic merging (arXiv 2410.07739, section 3.4): the fast form masks random rows of B (output channels)
and columns of A (input channels) instead of the full product BA, re-sampled every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_fraction(drop_rate: float) -> float:
    """Rows and columns are kept with the same fraction q, chosen so that q * q = 1 - drop_rate of BA survives."""
    return (1.0 - drop_rate) ** 0.5


def merge_masks(key: jax.Array, num_experts: int, d_in: int, d_out: int, drop_rate: float, rescale: bool):
    """Keep-masks (experts, d_in) for A's input channels and (experts, d_out) for B's output channels."""
    q = keep_fraction(drop_rate)
    key_a, key_b = jax.random.split(key)
    keep_in_ed = jax.random.bernoulli(key_a, q, (num_experts, d_in)).astype(jnp.float32)
    keep_out_ef = jax.random.bernoulli(key_b, q, (num_experts, d_out)).astype(jnp.float32)
    if rescale:
        keep_out_ef = keep_out_ef / (1.0 - drop_rate)
    return keep_in_ed, keep_out_ef
