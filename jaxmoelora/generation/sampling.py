"""Pure next-token choosers: greedy, temperature, and top-p (nucleus) sampling over `logits_bv`.

Order and semantics follow transformers' `TemperatureLogitsWarper` then `TopPLogitsWarper`
(transformers/generation/logits_process.py): logits are divided by the temperature first, then top-p keeps the smallest
set of most likely tokens whose cumulative probability reaches `top_p`, always keeping the most likely token.
`temperature` and `top_p` may be traced scalars, so one compiled function serves every value.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

# What the compiled decode loop specialises on; temperature and top_p values are runtime inputs.
SamplingMode = Literal["greedy", "sample", "top_p"]
SAMPLING_MODES: tuple[str, ...] = ("greedy", "sample", "top_p")


def sampling_mode(temperature: float, top_p: float) -> SamplingMode:
    """`greedy` for temperature 0, `top_p` when a nucleus cut is asked for, else plain `sample`."""
    if temperature == 0.0:
        return "greedy"
    return "top_p" if top_p < 1.0 else "sample"


def greedy(logits_bv: jax.Array) -> jax.Array:
    """The most likely token of each row (the lowest id on ties, as `torch.argmax`)."""
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


def top_p_mask(logits_bv: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Which tokens top-p keeps: token i stays if the probability of the tokens ranked strictly above it is < top_p.

    That is the smallest set of most likely tokens whose cumulative probability is >= top_p; the top token always stays
    (its preceding mass is 0). Ties at the cut are broken by rank in a stable descending sort.
    """
    probs_bv = jax.nn.softmax(logits_bv.astype(jnp.float32), axis=-1)
    order_bv = jnp.argsort(-probs_bv, axis=-1, stable=True)
    sorted_probs_bv = jnp.take_along_axis(probs_bv, order_bv, axis=-1)
    mass_before_bv = jnp.cumsum(sorted_probs_bv, axis=-1) - sorted_probs_bv
    keep_sorted_bv = mass_before_bv < top_p
    keep_sorted_bv = keep_sorted_bv.at[:, 0].set(True)
    # Scatter the sorted decision back to vocabulary order.
    return jax.vmap(lambda order_v, keep_v: jnp.zeros_like(keep_v).at[order_v].set(keep_v))(order_bv, keep_sorted_bv)


def top_p_logits(logits_bv: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Logits with every token outside the top-p set at -inf (softmax of the result renormalises the kept set)."""
    return jnp.where(top_p_mask(logits_bv, top_p), logits_bv, -jnp.inf)


def sample(logits_bv: jax.Array, key: jax.Array, *, temperature: jax.Array | float,
           top_p: jax.Array | float = 1.0, mode: SamplingMode | None = None) -> jax.Array:
    """One token per row. `mode` (static) picks the code path; by default it follows the Python values given.

    `greedy` ignores `key` and `temperature`; `sample` draws from softmax(logits / temperature); `top_p` additionally
    restricts the draw to the nucleus.
    """
    if mode is None:
        mode = sampling_mode(float(temperature), float(top_p))
    if mode == "greedy":
        return greedy(logits_bv)
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; use one of {SAMPLING_MODES}")
    scaled_bv = logits_bv.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if mode == "top_p":
        scaled_bv = top_p_logits(scaled_bv, top_p)
    return jax.random.categorical(key, scaled_bv, axis=-1).astype(jnp.int32)
