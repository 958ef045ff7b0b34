"""MoEFeedForward (MixLoRA, SLIM) equals a per-token loop over the selected experts, each computed literally as

    E_e(x) = (W2 + s B2_e A2_e)( act((W1 + s B1_e A1_e) x) * (W3 + s B3_e A3_e) x )        (MixLoRA [code])
    y      = sum_{j in top-k} w_j E_{i_j}(x)

where SLIM's identity experts are the frozen FFN alone, and SLIM's weight yielding adds gamma * relu(d) to the identity
experts' logits, d = max_c |x - c_nearest| / sigma_nearest - 1. Also: sliding clusters move in training only, and the
dynamic-merging masks are resampled every step, drop the configured share of B A and are off at inference by default.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoelora.adapters.config import ATTENTION_MODULES, FFN_MODULES, AdapterConfig, preset
from jaxmoelora.adapters.fast_random import expert_keep_masks, keep_mask, mask_seed
from jaxmoelora.adapters.ffn_moe import MoEFeedForward
from jaxmoelora.adapters.merging import merge_masks
from jaxmoelora.models.config import ModelConfig
from jaxmoelora.models.decoder import MLP

from adapter_helpers import TOL, context, f64, normal, np_silu, np_softmax, randomize_lora_b

FFN = ModelConfig(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8)
SHAPE = (2, 9)
MIXLORA = AdapterConfig(method="mixlora", target_modules=FFN_MODULES, rank=4, alpha=8.0, ffn_moe=True, num_experts=4,
                        top_k=2)
SLIM = AdapterConfig(method="slim", target_modules=ATTENTION_MODULES + FFN_MODULES, rank=4, alpha=8.0, ffn_moe=True,
                     num_experts=6, num_identity_experts=2, top_k=2, num_clusters=3, yield_strength=1.0)


def make_ffn(config: AdapterConfig, *, router_scale: float = 3.0, centre_scale: float = 1.0) -> MoEFeedForward:
    module = MoEFeedForward(MLP(FFN, rngs=nnx.Rngs(0), layers=None), "mlp", config, rngs=nnx.Rngs(1), layers=None)
    randomize_lora_b(module)
    module.router.set_value(normal(7, module.router.shape, router_scale / np.sqrt(FFN.hidden_size)))
    if module.cluster_centres is not None:
        module.cluster_centres.set_value(module.cluster_centres[...] * centre_scale)
    return module


def factors(experts):
    return f64(experts.lora_a[...]), f64(experts.lora_b[...])


def reference_ffn(module: MoEFeedForward, x_btd, *, factor_override=None):
    """Per token: route (with yielding), pick the top-k, run each picked expert as a whole FFN with its own merged
    weights, mix. Returns the output and the picked experts per token."""
    config = module.config
    base, s, n_id = module.base, config.scaling, config.num_identity_experts
    w1, w3, w2 = (f64(base.gate_proj.kernel[...]), f64(base.up_proj.kernel[...]), f64(base.down_proj.kernel[...]))
    (a1, b1), (a3, b3), (a2, b2) = factor_override or (factors(module.gate_experts), factors(module.up_experts),
                                                       factors(module.down_experts))
    x_btd = f64(x_btd)
    y_btd = np.zeros_like(x_btd)
    picked_bt = np.zeros(x_btd.shape[:2] + (config.top_k,), int)
    for b in range(x_btd.shape[0]):
        for t in range(x_btd.shape[1]):
            x = x_btd[b, t]
            logits = x @ f64(module.router[...])
            if module.cluster_centres is not None:
                centres, sigma = f64(module.cluster_centres[...]), f64(module.cluster_sigma[...])
                nearest = np.argmin(((x - centres) ** 2).sum(-1))
                d = np.max(np.abs(x - centres[nearest]) / sigma[nearest]) - 1.0
                logits[:n_id] += config.yield_strength * max(d, 0.0)
            probs = np_softmax(logits)
            chosen = np.argsort(-probs)[:config.top_k]
            weights = probs[chosen] / (probs[chosen].sum() if config.renormalize_topk else 1.0)
            picked_bt[b, t] = chosen
            for w, e in zip(weights, chosen):
                if e < n_id:  # identity expert: the frozen FFN
                    expert = np_silu(x @ w1) * (x @ w3) @ w2
                else:
                    l = e - n_id
                    w1_e, w3_e, w2_e = w1 + s * a1[l] @ b1[l], w3 + s * a3[l] @ b3[l], w2 + s * a2[l] @ b2[l]
                    expert = (np_silu(x @ w1_e) * (x @ w3_e)) @ w2_e
                y_btd[b, t] += w * expert
    return y_btd, picked_bt


@pytest.mark.parametrize("renormalize", [True, False])
def test_mixlora_equals_the_loop_over_selected_whole_ffn_experts(renormalize):
    module = make_ffn(MIXLORA.replace(renormalize_topk=renormalize))
    x_btd = normal(0, (*SHAPE, FFN.hidden_size))
    expected, picked = reference_ffn(module, x_btd)
    assert len(np.unique(picked)) == 4, "every expert should be picked by some token"
    for ctx in (None, context(train=False, shape=SHAPE), context(train=True, shape=SHAPE)):
        np.testing.assert_allclose(module(x_btd, ctx), expected, **TOL)


def test_slim_with_identity_experts_and_yielding_equals_the_loop():
    module = make_ffn(SLIM, router_scale=2.0, centre_scale=0.3)
    x_btd = normal(1, (*SHAPE, FFN.hidden_size))
    expected, picked = reference_ffn(module, x_btd)
    assert np.any(picked < 2) and np.any(picked >= 2), "the test needs tokens routed to both kinds of expert"
    np.testing.assert_allclose(module(x_btd, context(train=False, shape=SHAPE)), expected, **TOL)
    # The yielding shift matters: without the clusters the routing differs.
    no_yield = make_ffn(SLIM.replace(yield_strength=0.0), router_scale=2.0)
    assert not np.array_equal(reference_ffn(no_yield, x_btd)[1], picked)


def dense_reference_jnp(module: MoEFeedForward, x_btd, gate, up, down, router_de):
    """Every expert as a whole FFN with its own merged weights on every token, weighted by its renormalised top-k
    weight (zero when not picked): jax.numpy, so that jax.grad gives the reference gradients."""
    config, base = module.config, module.base
    s, n_id = config.scaling, config.num_identity_experts
    w1, w3, w2 = base.gate_proj.kernel[...], base.up_proj.kernel[...], base.down_proj.kernel[...]
    probs_bte = jax.nn.softmax(x_btd @ router_de, axis=-1)
    top_btk, index_btk = jax.lax.top_k(probs_bte, config.top_k)
    if config.renormalize_topk:
        top_btk = top_btk / jnp.sum(top_btk, axis=-1, keepdims=True)
    y_btd = jnp.zeros_like(x_btd)
    for e in range(config.num_experts):
        weight_bt = jnp.sum(jnp.where(index_btk == e, top_btk, 0.0), axis=-1)
        if e < n_id:
            expert_btd = (jax.nn.silu(x_btd @ w1) * (x_btd @ w3)) @ w2
        else:
            (a1, b1), (a3, b3), (a2, b2), l = gate, up, down, e - n_id
            w1_e, w3_e, w2_e = w1 + s * a1[l] @ b1[l], w3 + s * a3[l] @ b3[l], w2 + s * a2[l] @ b2[l]
            expert_btd = (jax.nn.silu(x_btd @ w1_e) * (x_btd @ w3_e)) @ w2_e
        y_btd = y_btd + weight_bt[..., None] * expert_btd
    return y_btd


@pytest.mark.parametrize("case", ["mixlora", "mixlora_no_renormalize", "slim_no_yielding"])
def test_gradients_equal_those_of_the_dense_reference(case):
    """The per-slot products, the recomputed slot hidden states and the hand-written expert VJPs give JAX's gradients
    of the plain dense mixture for every A, B, the router and x."""
    config = {"mixlora": MIXLORA, "mixlora_no_renormalize": MIXLORA.replace(renormalize_topk=False),
              "slim_no_yielding": SLIM.replace(num_clusters=0, merge_drop_rate=0.0)}[case]
    module = make_ffn(config)
    x_btd = normal(3, (*SHAPE, FFN.hidden_size))
    cotangent_btd = normal(4, (*SHAPE, FFN.hidden_size))
    graphdef, state = nnx.split(module)
    parts = ("gate_experts", "up_experts", "down_experts")

    def ours(state, x_btd):
        return jnp.sum(nnx.merge(graphdef, state)(x_btd, context(train=False, shape=SHAPE)) * cotangent_btd)

    def reference(gate, up, down, router_de, x_btd):
        return jnp.sum(dense_reference_jnp(module, x_btd, gate, up, down, router_de) * cotangent_btd)

    factors_in = [(getattr(module, p).lora_a[...], getattr(module, p).lora_b[...]) for p in parts]
    expected = jax.grad(reference, argnums=(0, 1, 2, 3, 4))(*factors_in, module.router[...], x_btd)
    grad_state, grad_x = jax.grad(ours, argnums=(0, 1))(state, x_btd)
    got = [(grad_state[p]["lora_a"][...], grad_state[p]["lora_b"][...]) for p in parts]
    got = (*got, grad_state["router"][...], grad_x)
    names = [f"{p} {factor}" for p in parts for factor in ("A", "B")] + ["router", "x"]
    assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(expected)) == len(names)
    for name, g, e in zip(names, jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert float(jnp.max(jnp.abs(e))) > 0, name
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=name)


def test_dropout_gives_each_picked_expert_its_own_masks_of_its_lora_inputs():
    """In training, the expert in top-k slot j sees x under slot j's gate and up masks in its gate/up LoRA, and its
    hidden state under slot j's down mask in its down LoRA; the frozen W1, W3 and W2 see the undropped inputs
    (MixLoRA [code]: the dropout sits inside each expert's LoRA)."""
    rate = 0.3
    module = make_ffn(MIXLORA.replace(dropout=rate))
    x_btd = normal(5, (*SHAPE, FFN.hidden_size))
    ctx = context(train=True, shape=SHAPE, seed=11)
    got = module(x_btd, ctx)
    k, f = module.config.top_k, FFN.intermediate_size
    keep_gate = [np.asarray(m) for m in expert_keep_masks(mask_seed(ctx.key_for("mlp/dropout_gate")), k, 1 - rate,
                                                          x_btd.shape)]
    keep_up = [np.asarray(m) for m in expert_keep_masks(mask_seed(ctx.key_for("mlp/dropout_up")), k, 1 - rate,
                                                        x_btd.shape)]
    keep_down_btkf = np.asarray(keep_mask(ctx.key_for("mlp/dropout_down"), (*SHAPE, k, f), 1 - rate))
    s, base = module.config.scaling, module.base
    w1, w3, w2 = (f64(base.gate_proj.kernel[...]), f64(base.up_proj.kernel[...]), f64(base.down_proj.kernel[...]))
    (a1, b1), (a3, b3), (a2, b2) = (factors(module.gate_experts), factors(module.up_experts),
                                    factors(module.down_experts))
    x = f64(x_btd)
    _, picked_btk = reference_ffn(module, x_btd)
    expected = np.zeros_like(x)
    for b in range(SHAPE[0]):
        for t in range(SHAPE[1]):
            probs = np_softmax(x[b, t] @ f64(module.router[...]))
            weights = probs[picked_btk[b, t]] / probs[picked_btk[b, t]].sum()
            for j, (w, e) in enumerate(zip(weights, picked_btk[b, t])):
                x_gate, x_up = x[b, t] * keep_gate[j][b, t] / (1 - rate), x[b, t] * keep_up[j][b, t] / (1 - rate)
                hidden = np_silu(x[b, t] @ w1 + s * x_gate @ a1[e] @ b1[e]) * (x[b, t] @ w3 + s * x_up @ a3[e] @ b3[e])
                dropped = hidden * keep_down_btkf[b, t, j] / (1 - rate)
                expected[b, t] += w * (hidden @ w2 + s * dropped @ a2[e] @ b2[e])
    np.testing.assert_allclose(got, expected, **TOL)
    # The masks matter: the output differs from the output without dropout.
    assert not np.allclose(got, module(x_btd, context(train=False, shape=SHAPE)), **TOL)


def test_tokens_routed_only_to_identity_experts_get_exactly_the_frozen_ffn():
    module = make_ffn(SLIM.replace(yield_strength=1e4), centre_scale=0.0)  # d is large: identity logits dominate
    x_btd = normal(2, (*SHAPE, FFN.hidden_size), 3.0)
    base = module.base(x_btd)
    for ctx in (context(train=False, shape=SHAPE), context(train=True, shape=SHAPE)):
        np.testing.assert_array_equal(module(x_btd, ctx), base)
    ctx = context(train=False, shape=SHAPE)
    module(x_btd, ctx)
    assert float(ctx.aux["mlp"]["identity_sum"]) == pytest.approx(SHAPE[0] * SHAPE[1])


def test_zero_b_gives_the_frozen_ffn_for_any_routing():
    module = MoEFeedForward(MLP(FFN, rngs=nnx.Rngs(0), layers=None), "mlp", MIXLORA.replace(dropout=0.2),
                            rngs=nnx.Rngs(1), layers=None)
    x_btd = normal(3, (*SHAPE, FFN.hidden_size))
    for ctx in (context(train=False, shape=SHAPE), context(train=True, shape=SHAPE)):
        np.testing.assert_array_equal(module(x_btd, ctx), module.base(x_btd))


def reference_slide(x_btd, mask_bt, centres, sigma, momentum):
    """Nearest centre per real token; each centre with tokens moves momentum of the way to their mean, its sigma
    momentum of the way to their per-channel standard deviation."""
    x, centres, sigma = f64(x_btd).reshape(-1, x_btd.shape[-1]), f64(centres).copy(), f64(sigma).copy()
    real = np.asarray(mask_bt).reshape(-1)
    nearest = np.array([np.argmin(((v - centres) ** 2).sum(-1)) for v in x])
    new_c, new_s = centres.copy(), sigma.copy()
    for k in range(len(centres)):
        members = x[(nearest == k) & real]
        if len(members):
            new_c[k] = (1 - momentum) * centres[k] + momentum * members.mean(0)
            new_s[k] = (1 - momentum) * sigma[k] + momentum * members.std(0)
    return new_c, new_s


def test_sliding_clusters_move_in_training_and_stay_at_inference():
    module = make_ffn(SLIM.replace(cluster_momentum=0.2), centre_scale=0.5)
    x_btd = normal(4, (*SHAPE, FFN.hidden_size))
    mask_bt = np.ones(SHAPE, bool)
    mask_bt[1, 6:] = False  # padding does not move the clusters
    centres, sigma = np.asarray(module.cluster_centres[...]), np.asarray(module.cluster_sigma[...])
    module(x_btd, context(train=False, shape=SHAPE, mask_bt=mask_bt))
    np.testing.assert_array_equal(module.cluster_centres[...], centres)
    np.testing.assert_array_equal(module.cluster_sigma[...], sigma)
    module(x_btd, context(train=True, shape=SHAPE, mask_bt=mask_bt))
    expected_c, expected_s = reference_slide(x_btd, mask_bt, centres, sigma, 0.2)
    assert not np.allclose(expected_c, centres)
    np.testing.assert_allclose(module.cluster_centres[...], expected_c, **TOL)
    np.testing.assert_allclose(module.cluster_sigma[...], expected_s, rtol=1e-4, atol=1e-4)


def test_merge_masks_drop_the_configured_share_of_b_a_and_change_with_the_key():
    drop = 0.3
    keep_in_ed, keep_out_ef = merge_masks(jax.random.key(0), 8, 256, 192, drop, rescale=False)
    # B' A' entry (i, j) survives when input channel i and output channel j are both kept.
    product_edf = np.asarray(keep_in_ed)[:, :, None] * np.asarray(keep_out_ef)[:, None, :]
    assert abs((product_edf == 0).mean() - drop) < 0.03
    other_in, other_out = merge_masks(jax.random.key(1), 8, 256, 192, drop, rescale=False)
    assert not np.array_equal(other_in, keep_in_ed) and not np.array_equal(other_out, keep_out_ef)
    _, rescaled = merge_masks(jax.random.key(0), 8, 256, 192, drop, rescale=True)
    np.testing.assert_allclose(rescaled, np.asarray(keep_out_ef) / (1 - drop), **TOL)


def test_masked_factors_zero_whole_rows_of_b_and_columns_of_a():
    module = make_ffn(SLIM.replace(merge_drop_rate=0.4))
    a_edr, b_erf = module.up_experts.factors(jax.random.key(3), module.config)
    delta_edf = np.einsum("edr,erf->edf", np.asarray(a_edr), np.asarray(b_erf))
    full_edf = np.einsum("edr,erf->edf", *[np.asarray(v) for v in (module.up_experts.lora_a[...],
                                                                     module.up_experts.lora_b[...])])
    kept = delta_edf != 0
    np.testing.assert_allclose(delta_edf[kept], full_edf[kept], **TOL)
    dropped_in_ed = ~kept.any(axis=2)
    dropped_out_ef = ~kept.any(axis=1)
    # Every zero of B'A' lies on a dropped input channel or a dropped output channel.
    np.testing.assert_array_equal(~kept, dropped_in_ed[:, :, None] | dropped_out_ef[:, None, :])


def test_dynamic_merging_changes_each_step_in_training_and_is_off_at_inference_by_default():
    config = SLIM.replace(merge_drop_rate=0.3, num_clusters=0, num_identity_experts=0, num_experts=4)
    module = make_ffn(config)
    x_btd = normal(5, (*SHAPE, FFN.hidden_size))
    clean, _ = reference_ffn(module, x_btd)
    np.testing.assert_allclose(module(x_btd, context(train=False, shape=SHAPE)), clean, **TOL)
    step1 = module(x_btd, context(train=True, shape=SHAPE, seed=1))
    step2 = module(x_btd, context(train=True, shape=SHAPE, seed=2))
    assert not np.allclose(step1, clean) and not np.allclose(step1, step2)
    # A training step equals the loop reference run with that step's masked factors.
    ctx = context(train=True, shape=SHAPE, seed=1)
    masked = [module.gate_experts.factors(ctx.key_for("mlp/merge_gate"), config),
              module.up_experts.factors(ctx.key_for("mlp/merge_up"), config),
              module.down_experts.factors(ctx.key_for("mlp/merge_down"), config)]
    expected, _ = reference_ffn(module, x_btd, factor_override=[(f64(a), f64(b)) for a, b in masked])
    np.testing.assert_allclose(step1, expected, **TOL)
    # merge_at_inference keeps masking at evaluation.
    at_inference = make_ffn(config.replace(merge_at_inference=True))
    eval1 = at_inference(x_btd, context(train=False, shape=SHAPE, seed=1))
    np.testing.assert_allclose(eval1, step1, **TOL)


def test_l1_penalty_is_normalised_by_rank_and_channels():
    module = make_ffn(preset("slim", rank=4, num_experts=6, num_identity_experts=2, l1_weight=1.0))
    ctx = context(train=False, shape=SHAPE)
    module(normal(6, (*SHAPE, FFN.hidden_size)), ctx)
    expected = 0.0
    for experts in (module.gate_experts, module.up_experts, module.down_experts):
        a, b = factors(experts)
        for e in range(a.shape[0]):  # sum over LoRA experts of |B|_1 / (r C_out) + |A|_1 / (r C_in)
            expected += np.abs(b[e]).sum() / (4 * b.shape[2]) + np.abs(a[e]).sum() / (4 * a.shape[1])
    np.testing.assert_allclose(ctx.aux["mlp"]["l1"], expected, **TOL)
