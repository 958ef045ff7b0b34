"""Routers: fp32 softmax gates, dense or top-k, and the per-token expert weights they give."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def router_probs(x_btd: jax.Array, router_de: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits and softmax probabilities (batch, time, experts), both fp32 (LoRAMoE/MixLoRA compute gates in fp32)."""
    logits_bte = jnp.einsum("btd,de->bte", x_btd.astype(jnp.float32), router_de.astype(jnp.float32))
    return logits_bte, jax.nn.softmax(logits_bte, axis=-1)


def topk_weights(probs_bte: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weights of the top-k experts per token: (dense weights_bte with zeros elsewhere, weights_btk, indices_btk).

    With `renormalize` the kept probabilities are divided by their sum (MixLoRA, SLIM); without, they stay raw softmax
    probabilities (Switch style)."""
    weights_btk, index_btk = jax.lax.top_k(probs_bte, top_k)
    if renormalize:
        weights_btk = weights_btk / jnp.sum(weights_btk, axis=-1, keepdims=True)
    onehot_btke = jax.nn.one_hot(index_btk, probs_bte.shape[-1], dtype=probs_bte.dtype)
    weights_bte = jnp.einsum("btk,btke->bte", weights_btk, onehot_btke)
    return weights_bte, weights_btk, index_btk


def routing_summary(probs_bte: jax.Array, index_btk: jax.Array | None, token_mask_bt: jax.Array) -> dict:
    """Partial sums for the load-balancing loss and the router statistics, over real tokens only.

    `selected_ke` counts, per top-k slot, the tokens sent to each expert (Mixtral's expert mask); for dense routers the
    single slot holds the probabilities themselves."""
    mask_bt1 = token_mask_bt.astype(jnp.float32)[..., None]
    num_experts = probs_bte.shape[-1]
    if index_btk is None:
        selected_btke = probs_bte[:, :, None, :]
    else:
        selected_btke = jax.nn.one_hot(index_btk, num_experts, dtype=jnp.float32)
    entropy_bt = -jnp.sum(probs_bte * jnp.log(jnp.clip(probs_bte, 1e-20)), axis=-1)
    top1_bte = jax.nn.one_hot(jnp.argmax(probs_bte, axis=-1), num_experts, dtype=jnp.float32)
    return {
        "selected_ke": jnp.einsum("btke,bt->ke", selected_btke, mask_bt1[..., 0]),
        "prob_sum_e": jnp.sum(probs_bte * mask_bt1, axis=(0, 1)),
        "top1_e": jnp.sum(top1_bte * mask_bt1, axis=(0, 1)),
        "entropy_sum": jnp.sum(entropy_bt * mask_bt1[..., 0]),
        "tokens": jnp.sum(mask_bt1),
    }
