"""Shared pieces of the adapter tests: a tiny Llama config, a forward context for calling one adapter module alone,
and the plain numpy building blocks the per-expert references are written with."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoelora.models.config import ModelConfig
from jaxmoelora.models.decoder import ForwardContext

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, max_position_embeddings=128)
TOL = dict(rtol=1e-5, atol=1e-5)


def context(train: bool = False, *, mask_bt=None, segment_ids_bt=None, task_type_bt=None, seed: int = 0,
            shape=(2, 6)) -> ForwardContext:
    """The context a decoder layer hands its modules, for calling one adapter module outside the model."""
    token_mask_bt = jnp.ones(shape, bool) if mask_bt is None else jnp.asarray(mask_bt, bool)
    return ForwardContext(attention=None, train=train, token_mask_bt=token_mask_bt, segment_ids_bt=segment_ids_bt,
                          task_type_bt=task_type_bt, rng=jax.random.key(seed))


def randomize_lora_b(module: nnx.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Gives every B factor (zero at initialisation) random nonzero values, in place."""
    state = nnx.state(module, nnx.LoRAParam)
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(state):
        if path[-1] == "lora_b":
            shape = variable.get_value().shape
            variable.set_value(jnp.asarray(scale * rng.standard_normal(shape), jnp.float32))
    nnx.update(module, state)


def normal(seed: int, shape, scale: float = 1.0) -> jax.Array:
    """Random test inputs drawn with numpy (each new shape of a jax.random call costs seconds of compilation)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)
