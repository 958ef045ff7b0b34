"""FFN-level mixtures (MixLoRA, SLIM): each expert is the frozen FFN with its own LoRA on gate, up and down, one router
per layer chooses the top-k experts per token; SLIM adds identity experts (the frozen FFN alone), weight yielding and
dynamic merging.

    E_e(x) = (W2 + s B2_e A2_e)( act((W1 + s B1_e A1_e) x) * (W3 + s B3_e A3_e) x )     (MixLoRA [code])
    y      = sum_{j in top-k} w_j E_{i_j}(x)

The frozen W1 x and W3 x are computed once. Because W2 is shared and linear, sum_j w_j W2 h_j = W2 (sum_j w_j h_j), so
the frozen down projection also runs once, on the mixed hidden state; only the low-rank parts are per expert.

Cost: each top-k slot keeps its expert's rank-r code with a one-hot over the E LoRA experts, so its B (gate, up) and A
(down) products contract over E * r, E times a grouped product's multiply-adds. A sorted, tiled grouped product was
measured no faster on CPU once made safe for data sharding (BENCHMARKS.md), and `jax.lax.ragged_dot` lowers to the same
dense product on XLA:CPU. The slots run one at a time with (batch, time, f) arrays, and each slot's hidden state is
recomputed in the backward pass rather than saved.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoelora.adapters.config import AdapterConfig
from jaxmoelora.adapters.fast_random import keep_mask
from jaxmoelora.adapters.initializers import make_initializer
from jaxmoelora.adapters.lora_linear import LoRAExperts, expert_outputs, lora_codes
from jaxmoelora.adapters.routing import router_probs, routing_summary, topk_weights
from jaxmoelora.adapters.variables import AdapterState, RouterParam
from jaxmoelora.adapters.yielding import out_of_domain_score, slide_clusters
from jaxmoelora.models.decoder import MLP
from jaxmoelora.models.layers import stacked_param


def slot_codes(x_btd: jax.Array, a_edr: jax.Array, key: jax.Array | None, dropout: float, top_k: int) -> jax.Array:
    """Every LoRA expert's code x A_e for each top-k slot: (batch, time, k, experts, rank), slot j's input under its
    own dropout mask when `key` is given (the same code for every slot without).

    The official code drops out x inside each expert, and a token reaches only the k experts it picked, so one mask
    per slot gives every used (token, expert) pair its own mask, as E masks per token would, for k masked copies of
    x instead of E."""
    e, d, r = a_edr.shape
    a_1dx = a_edr.astype(x_btd.dtype).transpose(1, 0, 2).reshape(1, d, e * r)
    codes_bt_x = lora_codes(x_btd, a_1dx, key=key, dropout=dropout, num_experts=top_k if key is not None else 1)
    codes_bt_x = jnp.broadcast_to(codes_bt_x, (*codes_bt_x.shape[:2], top_k, e * r))
    return codes_bt_x.reshape(*codes_bt_x.shape[:3], e, r)


@jax.custom_vjp
def expert_codes(h_btf: jax.Array, a_efr: jax.Array) -> jax.Array:
    """h A_e for every expert: (batch, time, experts, rank)."""
    return jnp.einsum("btf,efr->bter", h_btf, a_efr)


def _expert_codes_fwd(h_btf, a_efr):
    return expert_codes(h_btf, a_efr), (h_btf, a_efr)


def _expert_codes_bwd(residuals, g_bter):
    h_btf, a_efr = residuals
    # A's gradient with the rank-sized cotangent as the left operand (see `expert_outputs`).
    g_a_erf = jnp.einsum("bter,btf->erf", g_bter, h_btf)
    return jnp.einsum("bter,efr->btf", g_bter, a_efr), g_a_erf.transpose(0, 2, 1).astype(a_efr.dtype)


expert_codes.defvjp(_expert_codes_fwd, _expert_codes_bwd)


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
        # Slot j's LoRA expert as a one-hot over the LoRA experts; identity experts select none.
        lora_onehot_btke = jax.nn.one_hot(index_btk - n_id, config.num_lora_experts, dtype=x_btd.dtype)

        def key(part: str, needed: bool) -> jax.Array | None:
            return ctx.key_for(f"{self.name}/{part}") if needed and ctx is not None else None

        # Dynamic-merging masks in training, and at inference too when configured; dropout in training only.
        merge = config.merge_drop_rate > 0 and (train or config.merge_at_inference)
        dropout = train and config.dropout > 0
        s = config.scaling
        a_g, b_g = self.gate_experts.factors(key("merge_gate", merge), config)
        a_u, b_u = self.up_experts.factors(key("merge_up", merge), config)
        a_d, b_d = self.down_experts.factors(key("merge_down", merge), config)

        dtype = x_btd.dtype
        gate_btf, up_btf = base.gate_proj(x_btd), base.up_proj(x_btd)
        codes_g_btker = slot_codes(x_btd, a_g, key("dropout_gate", dropout), config.dropout, config.top_k)
        codes_u_btker = slot_codes(x_btd, a_u, key("dropout_up", dropout), config.dropout, config.top_k)
        b_g, b_u, a_d = b_g.astype(dtype), b_u.astype(dtype), a_d.astype(dtype)
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
        # One top-k slot at a time, each with its own (batch, time, f) arrays: a (batch, time, k, f) layout makes
        # XLA:CPU sum the k slots' gradients with a slow reduction over a middle axis.
        mixed_codes_bter = None
        for j in range(config.top_k):
            onehot_bte1 = lora_onehot_btke[:, :, j, :, None]  # slot j keeps only its own expert's rank-r code
            w_bt1 = w_btk[:, :, j, None]
            share_btf, down_in_btf = slot_hidden(
                gate_btf, up_btf, s * expert_outputs(codes_g_btker[:, :, j] * onehot_bte1, b_g),
                s * expert_outputs(codes_u_btker[:, :, j] * onehot_bte1, b_u), hidden0_btf, w_bt1,
                None if keep_btkf is None else keep_btkf[:, :, j])
            mixed_btf = mixed_btf + share_btf
            codes_d_bter = expert_codes(down_in_btf, a_d) * (w_bt1[..., None] * onehot_bte1)
            mixed_codes_bter = codes_d_bter if mixed_codes_bter is None else mixed_codes_bter + codes_d_bter
        out_btd = base.down_proj(mixed_btf) + s * expert_outputs(mixed_codes_bter, b_d.astype(dtype))
        if ctx is not None:
            aux = routing_summary(probs_bte, index_btk, ctx.token_mask_bt)
            if n_id:
                identity_bt = jnp.sum(weights_bte[:, :, :n_id], axis=-1)
                aux["identity_sum"] = jnp.sum(identity_bt * ctx.token_mask_bt)
            if config.l1_weight:
                aux["l1"] = self.gate_experts.l1() + self.up_experts.l1() + self.down_experts.l1()
            ctx.aux[self.name] = aux
        return out_btd
