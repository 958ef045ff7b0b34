"""Auxiliary losses of the methods and the router statistics, from the per-layer outputs of the adapter modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoelora.adapters.config import AdapterConfig


def localized_balancing_loss(probs_bte: jax.Array, task_type_bt: jax.Array, token_mask_bt: jax.Array | None,
                             segment_ids_bt: jax.Array | None, delta: float) -> jax.Array:
    """LoRAMoE's localized balancing constraint for one router, unweighted (official `peft/tuners/lora.py`):

        Q[m, n] = sum over the tokens of sample m of the routing probability of expert n
        I[m, n] = 1 + delta if expert n's half matches the sample's type else 1 - delta
                  (experts 0..N/2-1 match task_type 1, experts N/2..N-1 match task_type 0)
        loss    = var(I o Q) / (mean(I o Q)^2 + 1e-10), var unbiased, pooled over samples and experts.

    A sample is a row of the batch, or a packed segment when `segment_ids_bt` is given. Padding counts in Q as in the
    official code unless `token_mask_bt` is given. `task_type_bt` holds each token's sample type (-1 on padding).
    """
    b, t, n = probs_bte.shape
    if token_mask_bt is not None:
        probs_bte = probs_bte * token_mask_bt[..., None].astype(probs_bte.dtype)
    if segment_ids_bt is None:
        sample_bt = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        num_samples = b
        present_m = jnp.ones((b,), bool)
    else:
        sample_bt = jnp.where(segment_ids_bt > 0, jnp.arange(b)[:, None] * t + segment_ids_bt - 1, b * t)
        num_samples = b * t
        present_m = jax.ops.segment_sum(jnp.ones((b * t,)), sample_bt.reshape(-1), num_samples + 1)[:-1] > 0
    q_mn = jax.ops.segment_sum(probs_bte.reshape(-1, n), sample_bt.reshape(-1), num_samples + 1)[:num_samples]
    type_m = jax.ops.segment_max(task_type_bt.reshape(-1), sample_bt.reshape(-1), num_samples + 1)[:num_samples]
    half = n // 2
    matched_mn = jnp.concatenate([jnp.repeat((type_m == 1)[:, None], half, 1),
                                  jnp.repeat((type_m == 0)[:, None], half, 1)], axis=1)
    z_mn = q_mn * jnp.where(matched_mn, 1.0 + delta, 1.0 - delta)
    weight_mn = jnp.broadcast_to(present_m[:, None], z_mn.shape).astype(z_mn.dtype)
    count = jnp.sum(weight_mn)
    mean = jnp.sum(z_mn * weight_mn) / count
    var = jnp.sum(weight_mn * (z_mn - mean) ** 2) / jnp.maximum(count - 1, 1)
    return jnp.where(count > 1, var / (mean ** 2 + 1e-10), 0.0)


def expert_contrastive_loss(outputs_enf: jax.Array, valid_n: jax.Array, temperature: float) -> jax.Array:
    """MoELoRA's expert contrastive loss (InfoNCE), with this project's choices: cosine similarity; query = expert e's
    output on token n; positive = expert e's output on the next sampled token (n+1, cyclic); negatives = every other
    expert's output on token n; mean over (e, n)."""
    squared_norm_en1 = jnp.sum(outputs_enf * outputs_enf, axis=-1, keepdims=True)
    unit_enf = outputs_enf * jax.lax.rsqrt(jnp.maximum(squared_norm_en1, 1e-16))  # finite gradient at zero outputs
    positive_en = jnp.sum(unit_enf * jnp.roll(unit_enf, -1, axis=1), axis=-1) / temperature
    similarity_nee = jnp.einsum("enf,gnf->neg", unit_enf, unit_enf) / temperature
    num_experts = outputs_enf.shape[0]
    others_nee = jnp.where(jnp.eye(num_experts, dtype=bool)[None], -jnp.inf, similarity_nee)
    logits_ne1 = jnp.concatenate([positive_en.T[..., None], others_nee], axis=-1)
    loss_ne = -jax.nn.log_softmax(logits_ne1, axis=-1)[..., 0]
    pair_valid_n = (valid_n & jnp.roll(valid_n, -1)).astype(loss_ne.dtype)
    return jnp.sum(loss_ne * pair_valid_n[:, None]) / jnp.maximum(jnp.sum(pair_valid_n) * num_experts, 1.0)


def sampled_expert_contrastive_loss(key: jax.Array, codes_bter: jax.Array, b_erf: jax.Array,
                                    token_mask_bt: jax.Array, num_tokens: int, temperature: float,
                                    scaling: float) -> jax.Array:
    """The contrastive loss on `num_tokens` real tokens drawn at random: every expert's output there is computed
    (the top-k forward never computes unselected experts' outputs, so they are formed here for the sample)."""
    flat_mask = token_mask_bt.reshape(-1)
    scores = jax.random.uniform(key, flat_mask.shape) + 2.0 * flat_mask
    num_tokens = min(num_tokens, flat_mask.shape[0])
    _, picked_n = jax.lax.top_k(scores, num_tokens)
    codes_ner = codes_bter.reshape(-1, *codes_bter.shape[2:])[picked_n]
    outputs_enf = scaling * jnp.einsum("ner,erf->enf", codes_ner.astype(jnp.float32), b_erf.astype(jnp.float32))
    return expert_contrastive_loss(outputs_enf, flat_mask[picked_n], temperature)


def load_balancing_loss(selected_ke: jax.Array, prob_sum_e: jax.Array, tokens: jax.Array) -> jax.Array:
    """Switch/Mixtral loss N * sum_k sum_e f[k, e] P[e] from sums over real tokens (MixLoRA
    `_mixtral_load_balancing_loss_func`): f = share of tokens whose k-th choice is e, P = mean probability of e."""
    tokens = jnp.maximum(tokens, 1.0)
    return prob_sum_e.shape[-1] * jnp.sum((selected_ke / tokens) * (prob_sum_e / tokens)[None, :])


def finalize_aux(aux_per_layer: dict, config: AdapterConfig) -> tuple[dict, dict]:
    """Weighted auxiliary losses {name: scalar} and router statistics {module: {name: per-layer array}} from the
    stacked per-layer outputs {module: {quantity: (layers, ...)}} of the adapter modules.

    LoRAMoE's constraint is summed over every wrapped linear and layer, each weighted by beta (official code). The
    load-balancing loss pools the routing of all routers and layers, as MixLoRA concatenates router logits."""
    losses: dict = {}
    modules = list(aux_per_layer.values())
    lbc = [m["lbc"] for m in modules if "lbc" in m]
    if lbc:
        losses["lbc"] = config.lbc_weight * sum(jnp.sum(x) for x in lbc)
    routed = [m for m in modules if "selected_ke" in m]
    if routed and config.load_balance_weight and config.top_k:
        selected_ke = sum(jnp.sum(m["selected_ke"], axis=0) for m in routed)
        prob_sum_e = sum(jnp.sum(m["prob_sum_e"], axis=0) for m in routed)
        tokens = sum(jnp.sum(m["tokens"]) for m in routed)
        losses["load_balance"] = config.load_balance_weight * load_balancing_loss(selected_ke, prob_sum_e, tokens)
    contrastive = [m["contrastive"] for m in modules if "contrastive" in m]
    if contrastive:
        losses["contrastive"] = config.contrastive_weight * sum(jnp.mean(x) for x in contrastive) / len(contrastive)
    l1 = [m["l1"] for m in modules if "l1" in m]
    if l1 and config.l1_weight:
        losses["l1"] = config.l1_weight * sum(jnp.sum(x) for x in l1)

    stats: dict = {}
    for name, m in aux_per_layer.items():
        if "selected_ke" not in m:
            continue
        tokens_l = jnp.maximum(m["tokens"], 1.0)
        slots = m["selected_ke"].shape[1]
        module_stats = {
            "load_share": jnp.sum(m["selected_ke"], axis=1) / (tokens_l[:, None] * slots),
            "router_entropy": m["entropy_sum"] / tokens_l,
            "top1_share": m["top1_e"] / tokens_l[:, None],
        }
        if "identity_sum" in m:
            module_stats["identity_share"] = m["identity_sum"] / tokens_l
        stats[name] = module_stats
    return losses, stats
