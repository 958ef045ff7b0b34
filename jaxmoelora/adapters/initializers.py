"""Initializers of adapter factors and routers, named as in the official code."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoelora.errors import ConfigError


def kaiming_uniform_sqrt5(fan_in: int):
    """PyTorch's `kaiming_uniform_(w, a=sqrt(5))` for a (out, fan_in) weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def make_initializer(name: str, fan_in: int, std: float = 0.02):
    if name == "kaiming_uniform":
        return kaiming_uniform_sqrt5(fan_in)
    if name == "normal":
        return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)
    if name == "zeros":
        return lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)
    raise ConfigError(f"unknown initializer {name!r}; use 'kaiming_uniform', 'normal' or 'zeros'")
