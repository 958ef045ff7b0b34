"""Cross-entropy of the frozen output head, fused with its gradient and computed in chunks of tokens.

The plain loss materialises the (tokens, vocab) logits, about 400 MB for 2,048 tokens of a 49k vocabulary in fp32,
and the backward pass writes a second array of that size for their gradient. Here the logits of a chunk of tokens
live only while the chunk is processed, and the gradient with respect to the hidden states is computed in the same
pass (softmax minus one-hot, times the head), so the backward pass only scales it. The head is frozen (adapters never
target it), so no gradient for it is formed.

Tokens outside the loss (prompts, padding) need no logits. Each row's loss tokens are moved to its front (a gather of
the hidden states), so the chunks at the end hold none of them in any row and are skipped; on instruction data, where
the prompt is often half of the tokens, that removes a large share of the head's work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LOSS_CHUNK_TOKENS = 256  # tokens whose logits exist at once (per chunk: tokens x vocab fp32)


def _chunk_loss_and_grad(hidden_bcd: jax.Array, head_vd: jax.Array, targets_bc: jax.Array, weights_bc: jax.Array):
    logits_bcv = jnp.einsum("bcd,vd->bcv", hidden_bcd, head_vd.astype(hidden_bcd.dtype),
                            preferred_element_type=jnp.float32)
    # One exponential per logit, shared by the log-sum-exp and the softmax: exp is the costliest elementwise op here.
    max_bc = jnp.max(logits_bcv, axis=-1)
    exp_bcv = jnp.exp(logits_bcv - max_bc[..., None])
    sum_bc = jnp.sum(exp_bcv, axis=-1)
    lse_bc = max_bc + jnp.log(sum_bc)
    target_logit_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
    ce_sum = jnp.sum((lse_bc - target_logit_bc) * weights_bc)
    onehot_bcv = jax.nn.one_hot(targets_bc, logits_bcv.shape[-1], dtype=jnp.float32)
    grad_logits_bcv = exp_bcv * (weights_bc / sum_bc)[..., None] - onehot_bcv * weights_bc[..., None]
    grad_hidden_bcd = jnp.einsum("bcv,vd->bcd", grad_logits_bcv.astype(hidden_bcd.dtype),
                                 head_vd.astype(hidden_bcd.dtype), preferred_element_type=jnp.float32)
    return ce_sum, grad_hidden_bcd


def _skipped_chunk(hidden_bcd, head_vd, targets_bc, weights_bc):
    return jnp.zeros((), jnp.float32), jnp.zeros(hidden_bcd.shape, jnp.float32)


def _loss_and_grad(hidden_btd, head_vd, targets_bt, weights_bt, chunk_tokens):
    b, t, d = hidden_btd.shape
    # Each row's loss tokens first (stable, so in their order), then every other token.
    order_bt = jnp.argsort(weights_bt == 0, axis=1, stable=True)
    hidden_btd = jnp.take_along_axis(hidden_btd, order_bt[..., None], axis=1)
    targets_bt = jnp.take_along_axis(targets_bt, order_bt, axis=1)
    weights_bt = jnp.take_along_axis(weights_bt, order_bt, axis=1)
    chunk_t = max(1, min(t, chunk_tokens // b))
    pad = -t % chunk_t
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk_t

    def by_chunk(x):  # (b, t, ...) -> (chunks, b, chunk_t, ...): the batch axis (and its sharding) stays whole
        return jnp.moveaxis(x.reshape(b, n, chunk_t, *x.shape[2:]), 1, 0)

    def one_chunk(total, chunk):
        hidden_bcd, targets_bc, weights_bc = chunk
        ce_sum, grad_bcd = jax.lax.cond(jnp.any(weights_bc != 0), _chunk_loss_and_grad, _skipped_chunk,
                                        hidden_bcd, head_vd, targets_bc, weights_bc)
        return total + ce_sum, grad_bcd

    ce_sum, grad_nbcd = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32),
                                     (by_chunk(hidden_btd), by_chunk(targets_bt), by_chunk(weights_bt)))
    grad_btd = jnp.moveaxis(grad_nbcd, 0, 1).reshape(b, n * chunk_t, d)[:, :t]
    return ce_sum, jnp.take_along_axis(grad_btd, jnp.argsort(order_bt, axis=1)[..., None], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_cross_entropy(hidden_btd, head_vd, targets_bt, weights_bt, chunk_tokens):
    return _loss_and_grad(hidden_btd, head_vd, targets_bt, weights_bt, chunk_tokens)[0]


def _fwd(hidden_btd, head_vd, targets_bt, weights_bt, chunk_tokens):
    ce_sum, grad_btd = _loss_and_grad(hidden_btd, head_vd, targets_bt, weights_bt, chunk_tokens)
    return ce_sum, (grad_btd.astype(hidden_btd.dtype), head_vd)


def _bwd(chunk_tokens, residuals, g):
    grad_btd, head_vd = residuals
    return g.astype(grad_btd.dtype) * grad_btd, jnp.zeros_like(head_vd), None, None


_head_cross_entropy.defvjp(_fwd, _bwd)


def head_cross_entropy(hidden_btd: jax.Array, head_vd: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array,
                       chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy of `hidden_btd @ head_vd.T` over the masked tokens, and their count: the same values as
    `token_loss` on the logits. Differentiable with respect to the hidden states only (the head is frozen)."""
    weights_bt = loss_mask_bt.astype(jnp.float32)
    ce_sum = _head_cross_entropy(hidden_btd, jax.lax.stop_gradient(head_vd), targets_bt, weights_bt, chunk_tokens)
    return ce_sum, jnp.sum(weights_bt)
