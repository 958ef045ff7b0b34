"""Building blocks whose parameters carry logical axis names and may be stacked over decoder layers.

Every parameter is an `nnx.Param` with metadata `logical_axes`, e.g. ('layers', 'embed', 'mlp'); the sharding rules in
`jaxmoelora.sharding` map those names onto a mesh. Modules built with `layers=L` hold their parameters stacked with a
leading ('layers',) axis of size L; inside the layer scan each call sees one layer's slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def stacked_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
                  dtype, layers: int | None, variable_type: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A parameter of `shape`, or `(layers, *shape)` initialised independently per layer by a vmapped initializer."""
    shape, axes = tuple(shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    key = rngs.params()
    if layers is None:
        return variable_type(init(key, shape, dtype), logical_axes=axes)
    value = jax.vmap(lambda k: init(k, shape, dtype))(jax.random.split(key, layers))
    return variable_type(value, logical_axes=("layers", *axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel stored (d_in, d_out) like `flax.nnx.Linear` (Hugging Face stores (d_out, d_in))."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str | None, str | None], use_bias: bool, dtype,
                 param_dtype, rngs: nnx.Rngs, layers: int | None = None):
        self.kernel = stacked_param(rngs, nnx.initializers.lecun_normal(), (d_in, d_out), axes, param_dtype, layers)
        self.bias = (stacked_param(rngs, nnx.initializers.zeros_init(), (d_out,), axes[1:], param_dtype, layers)
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x_btd: jax.Array, ctx=None) -> jax.Array:
        """`ctx` (a `ForwardContext`) is ignored here; adapter modules that replace a Linear use it."""
        y_btf = jnp.einsum("btd,df->btf", x_btd.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y_btf = y_btf + self.bias[...].astype(self.dtype)
        return y_btf


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in fp32, scaled after casting back (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype, rngs: nnx.Rngs,
                 layers: int | None = None):
        self.weight = stacked_param(rngs, nnx.initializers.ones_init(), (dim,), (axis_name,), param_dtype, layers)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab, embed); `attend` gives logits for tied output embeddings."""

    def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = stacked_param(rngs, nnx.initializers.normal(0.02), (vocab_size, dim), ("vocab", "embed"),
                                       param_dtype, None)
        self.dtype = dtype

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids_bt, axis=0).astype(self.dtype)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        return jnp.einsum("btd,vd->btv", x_btd, self.embedding[...].astype(x_btd.dtype))


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
