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


def _hashed_bits(index: jax.Array, seed: jax.Array) -> jax.Array:
    """Uniform-looking uint32 bits for each element index under a seed."""
    return _mix(_mix(index * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])


def mask_seed(key: jax.Array) -> jax.Array:
    """The two uint32 words a key's masks are hashed from (an integer array, so it can pass through custom VJPs)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
    """Boolean mask, each entry True with probability `keep_prob`, a deterministic function of `key`."""
    bits = _hashed_bits(jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape), mask_seed(key))
    threshold = min(int(keep_prob * 2 ** 32), 2 ** 32 - 1)
    return bits < jnp.uint32(threshold)


def expert_keep_masks(seed: jax.Array, num_experts: int, keep_prob: float, shape_btd: tuple[int, int, int],
                      time_start: jax.Array | int = 0, time_size: int | None = None) -> list[jax.Array]:
    """Every expert's dropout keep-mask over time steps [time_start, time_start + time_size) of an input of shape
    `shape_btd`: (batch, time_size, d) booleans, the same entries whichever window is asked for, so a loop over time
    windows sees the masks of the whole input.

    Two experts share one 32-bit hash (16 bits each), so `keep_prob` is rounded to a multiple of 2**-16."""
    b, t, d = shape_btd
    time_size = t if time_size is None else time_size
    shape = (b, time_size, d)
    row = (jax.lax.broadcasted_iota(jnp.uint32, shape, 0) * jnp.uint32(t)
           + jax.lax.broadcasted_iota(jnp.uint32, shape, 1) + jnp.asarray(time_start, jnp.uint32))
    cell = row * jnp.uint32(d) + jax.lax.broadcasted_iota(jnp.uint32, shape, 2)
    threshold = jnp.uint32(min(round(keep_prob * 2 ** 16), 2 ** 16))
    masks = []
    for pair in range((num_experts + 1) // 2):
        bits = _hashed_bits(cell + jnp.uint32(pair * b * t * d % 2 ** 32), seed)
        masks += [(bits & jnp.uint32(0xFFFF)) < threshold, (bits >> 16) < threshold]
    return masks[:num_experts]
