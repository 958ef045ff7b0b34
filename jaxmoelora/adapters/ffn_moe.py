"""FFN-level mixtures (MixLoRA, SLIM): each expert is the frozen FFN with its own LoRA on gate, up and down, one router
per layer chooses the top-k experts per token; SLIM adds identity experts (the frozen FFN alone), weight yielding and
dynamic merging.

    E_e(x) = (W2 + s B2_e A2_e)( act((W1 + s B1_e A1_e) x) * (W3 + s B3_e A3_e) x )     (MixLoRA [code])
    y      = sum_{j in top-k} w_j E_{i_j}(x)

The frozen W1 x and W3 x are computed once. Because W2 is shared and linear, sum_j w_j W2 h_j = W2 (sum_j w_j h_j), so
the frozen down projection also runs once, on the mixed hidden state; only the low-rank parts are per expert.

Cost: within each top-k slot the tokens are sorted by their LoRA expert into tiles of one expert each
(`grouped_experts.py`), so every low-rank product contracts over the rank r: the expert products cost what one LoRA of
rank r per slot costs, plus moving the slot's rows into and out of expert order. Sorting stays within slices of the
batch that lie on one device. On XLA:CPU this measured 10% faster per FFN layer than a one-hot over all E experts at
2,048 tokens and level at 512 (BENCHMARKS.md); `jax.lax.ragged_dot` lowers to the dense one-hot product there. The
slots run one at a time with (batch, time, f) arrays, and each slot's hidden state is recomputed in the backward pass
rather than saved.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoelora.adapters.config import AdapterConfig
from jaxmoelora.adapters.fast_random import keep_mask
from jaxmoelora.adapters.grouped_experts import (batch_groups, group_tokens, tile_products, tile_size_for,
                                                to_sorted_rows, to_token_rows)
from jaxmoelora.adapters.initializers import make_initializer
from jaxmoelora.adapters.lora_linear import LoRAExperts, expert_dropout
from jaxmoelora.adapters.routing import router_probs, routing_summary, topk_weights
from jaxmoelora.adapters.variables import AdapterState, RouterParam
from jaxmoelora.adapters.yielding import out_of_domain_score, slide_clusters
from jaxmoelora.models.decoder import MLP
from jaxmoelora.models.layers import stacked_param


def slot_inputs(x_btd: jax.Array, key: jax.Array | None, dropout: float, top_k: int) -> list[jax.Array]:
    """The LoRA input x of each top-k slot, under the slot's own dropout mask when `key` is given.

    The official code drops out x inside each expert, and a token reaches only the k experts it picked, so one mask
    per slot gives every used (token, expert) pair its own mask, as E masks per token would."""
    return [x_btd] * top_k if key is None else list(expert_dropout(key, x_btd, dropout, top_k))


def _slot_hidden(act, dropout: float, gate_btf, up_btf, delta_g_btf, delta_u_btf, hidden0_btf, w_bt1, keep_btf):
    """One top-k slot's expert hidden state act(W1 x + dg) * (W3 x + du): its weighted share of the mixed hidden
    state (relative to the frozen h0 when given) and, dropped out when `keep_btf` is given, its down-projection
    input."""
    hidden_btf = act(gate_btf + delta_g_btf) * (up_btf + delta_u_btf)
    share_btf = w_bt1 * (hidden_btf if hidden0_btf is None else hidden_btf - hidden0_btf)
    if keep_btf is not None:
        hidden_btf = jnp.where(keep_btf, hidden_btf / (1.0 - dropout), 0).astype(hidden_btf.dtype)
    return share_btf, hidden_btf


class MoEFeedForward(nnx.Module):
    def __init__(self, base: MLP, name: str, config: AdapterConfig, *, rngs: nnx.Rngs, layers: int | None):
        d, f = base.gate_proj.kernel.shape[-2:]
        self.base = base
        self.name = name
        self.config = config
        lora = dict(config=config, rngs=rngs, layers=layers)
        e = config.num_lora_experts
        self.gate_experts = LoRAExperts(d, f, e, in_axis="embed", out_axis="mlp", **lora)
        self.up_experts = LoRAExperts(d, f, e, in_axis="embed", out_axis="mlp", **lora)
        self.down_experts = LoRAExperts(f, d, e, in_axis="mlp", out_axis="embed", **lora)
        init = make_initializer(config.router_init, d, config.router_init_range)
        self.router = stacked_param(rngs, init, (d, config.num_experts), ("embed", "expert"), jnp.float32, layers,
                                    RouterParam)
        if config.num_clusters:
            k = config.num_clusters
            normal = lambda key, shape, dtype: jax.random.normal(key, shape, dtype)  # noqa: E731
            ones = lambda key, shape, dtype: jnp.ones(shape, dtype)  # noqa: E731
            self.cluster_centres = stacked_param(rngs, normal, (k, d), (None, "embed"), jnp.float32, layers,
                                                 AdapterState)
            self.cluster_sigma = stacked_param(rngs, ones, (k, d), (None, "embed"), jnp.float32, layers, AdapterState)
        else:
            self.cluster_centres = self.cluster_sigma = None

    def __call__(self, x_btd: jax.Array, ctx=None) -> jax.Array:
        config, base = self.config, self.base
        train = ctx is not None and ctx.train
        n_id = config.num_identity_experts
        logits_bte, _ = router_probs(x_btd, self.router[...])
        if self.cluster_centres is not None:
            x32_btd = x_btd.astype(jnp.float32)
            d_bt = out_of_domain_score(x32_btd, self.cluster_centres[...], self.cluster_sigma[...])
            shift_bt = config.yield_strength * jax.nn.relu(d_bt)
            logits_bte = logits_bte.at[:, :, :n_id].add(shift_bt[..., None])
            if train:
                centres, sigma = slide_clusters(x32_btd, ctx.token_mask_bt.astype(jnp.float32),
                                                self.cluster_centres[...], self.cluster_sigma[...],
                                                config.cluster_momentum)
                self.cluster_centres.set_value(centres)
                self.cluster_sigma.set_value(sigma)
        probs_bte = jax.nn.softmax(logits_bte, axis=-1)
        weights_bte, weights_btk, index_btk = topk_weights(probs_bte, config.top_k, config.renormalize_topk)

        def key(part: str, needed: bool) -> jax.Array | None:
            return ctx.key_for(f"{self.name}/{part}") if needed and ctx is not None else None

        # Dynamic-merging masks in training, and at inference too when configured; dropout in training only.
        merge = config.merge_drop_rate > 0 and (train or config.merge_at_inference)
        dropout = train and config.dropout > 0
        s, dtype = config.scaling, x_btd.dtype
        a_g, b_g = (f.astype(dtype) for f in self.gate_experts.factors(key("merge_gate", merge), config))
        a_u, b_u = (f.astype(dtype) for f in self.up_experts.factors(key("merge_up", merge), config))
        a_d, b_d = (f.astype(dtype) for f in self.down_experts.factors(key("merge_down", merge), config))

        gate_btf, up_btf = base.gate_proj(x_btd), base.up_proj(x_btd)
        x_gate_k = slot_inputs(x_btd, key("dropout_gate", dropout), config.dropout, config.top_k)
        x_up_k = slot_inputs(x_btd, key("dropout_up", dropout), config.dropout, config.top_k)
        w_btk = weights_btk.astype(dtype)
        # h0 + sum_j w_j (h_j - h0) equals sum_j w_j h_j when the weights sum to one, and is exactly the frozen FFN's
        # hidden state when every adapter is zero (identity experts, B = 0).
        hidden0_btf = None
        if config.renormalize_topk:
            hidden0_btf = jax.checkpoint(lambda g, u: base.act(g) * u)(gate_btf, up_btf)
        mixed_btf = hidden0_btf if config.renormalize_topk else jnp.zeros_like(gate_btf)
        keep_btkf = None
        if dropout:
            keep_btkf = keep_mask(key("dropout_down", dropout), (*gate_btf.shape[:2], config.top_k,
                                                                  gate_btf.shape[2]), 1.0 - config.dropout)
        # Recomputed in the backward pass from its inputs: saving its intermediates costs more memory traffic.
        slot_hidden = jax.checkpoint(functools.partial(_slot_hidden, base.act, config.dropout))

        b, t = x_btd.shape[:2]
        groups = batch_groups(b)
        tile = tile_size_for(b // groups * t, config.num_lora_experts)
        grouped = lambda a_bt_: a_bt_.reshape(groups, -1, *a_bt_.shape[2:])  # noqa: E731
        ungrouped = lambda a_gn_: a_gn_.reshape(b, t, *a_gn_.shape[2:])  # noqa: E731
        lora_out_btd = jnp.zeros_like(x_btd)
        # One top-k slot at a time, each with its own (batch, time, f) arrays; within a slot the tokens are sorted by
        # their LoRA expert (identity experts pick none), so every low-rank product contracts over r alone.
        for j in range(config.top_k):
            grouping = group_tokens(grouped(index_btk[:, :, j] - n_id), config.num_lora_experts, tile)
            sorted_rows = lambda a_bt_: to_sorted_rows(grouped(a_bt_), grouping)  # noqa: E731
            token_rows = lambda a_gl_: ungrouped(to_token_rows(a_gl_, grouping))  # noqa: E731

            def lora_delta(x_k, a_edr, b_erf):
                codes_glr = tile_products(sorted_rows(x_k[j]), a_edr, grouping)
                return s * token_rows(tile_products(codes_glr, b_erf, grouping))

            w_bt1 = w_btk[:, :, j, None]
            share_btf, down_in_btf = slot_hidden(
                gate_btf, up_btf, lora_delta(x_gate_k, a_g, b_g), lora_delta(x_up_k, a_u, b_u), hidden0_btf, w_bt1,
                None if keep_btkf is None else keep_btkf[:, :, j])
            mixed_btf = mixed_btf + share_btf
            codes_d_glr = tile_products(sorted_rows(down_in_btf), a_d, grouping) * sorted_rows(w_bt1)
            lora_out_btd = lora_out_btd + token_rows(tile_products(codes_d_glr, b_d, grouping))
        out_btd = base.down_proj(mixed_btf) + s * lora_out_btd
        if ctx is not None:
            aux = routing_summary(probs_bte, index_btk, ctx.token_mask_bt)
            if n_id:
                identity_bt = jnp.sum(weights_bte[:, :, :n_id], axis=-1)
                aux["identity_sum"] = jnp.sum(identity_bt * ctx.token_mask_bt)
            if config.l1_weight:
                aux["l1"] = self.gate_experts.l1() + self.up_experts.l1() + self.down_experts.l1()
            ctx.aux[self.name] = aux
        return out_btd
