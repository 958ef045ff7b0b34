"""Cheap random keep-masks for dropout and dynamic merging.

`jax.random.bernoulli` (threefry) costs ~60 ns per element on CPU, which made per-expert dropout (experts x tokens x
d_in values per linear) the dominant cost of a LoRAMoE step. Here a counter-based hash (two rounds of the murmur3
finalizer over the element index, seeded with 64 bits drawn from the JAX key) gives independent-looking uniform bits
at ~1 ns per element. Statistical quality is ample for dropout; it is not a cryptographic or simulation-grade RNG.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _mix(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
    """Boolean mask, each entry True with probability `keep_prob`, a deterministic function of `key`."""
    return keep_mask_from_seed(mask_seed(key), shape, keep_prob)


def mask_seed(key: jax.Array) -> jax.Array:
    """The two uint32 words a key's masks are hashed from (an integer array, so it can pass through custom VJPs)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def keep_mask_from_seed(seed: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits = _mix(_mix(index * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    threshold = min(int(keep_prob * 2 ** 32), 2 ** 32 - 1)
    return bits < jnp.uint32(threshold)
