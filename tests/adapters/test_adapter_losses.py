"""Auxiliary losses against plain references:

- LoRAMoE's localized balancing constraint: a per-sample numpy loop, and a PyTorch transcription of the official
  `peft/tuners/lora.py` forward and `cv_squared` (../shared/METHODS.md 1.4); padding masked; packed segments.
- Switch/Mixtral load balancing: a numpy transcription of MixLoRA's `_mixtral_load_balancing_loss_func` (router
  logits of every layer concatenated, padding masked through the attention mask).
- MoELoRA's expert contrastive loss: an InfoNCE loop with the project's documented choices.
- How finalize_aux weighs and pools the per-module, per-layer terms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoelora.adapters import losses
from jaxmoelora.adapters.config import AdapterConfig
from jaxmoelora.adapters.lora_linear import AdaptedLinear
from jaxmoelora.adapters.routing import routing_summary, topk_weights
from jaxmoelora.models.layers import Linear

from adapter_helpers import TOL, context, f64, normal, np_softmax, randomize_lora_b


# ----------------------------------------------------------------------------------------------------------------------
# LoRAMoE localized balancing constraint.

def reference_lbc(probs_bte, task_type_bt, delta, token_mask_bt=None, segment_ids_bt=None):
    """Samples are rows (or packed segments, id > 0). Q[m, n] = sum over the sample's tokens (real ones only when a
    mask is given) of p_n; I = 1 + delta where expert n's half matches the sample's type (first half: type 1, second
    half: type 0), else 1 - delta; loss = var(Z) / mean(Z)^2 with the unbiased variance over all samples and experts."""
    probs, types = f64(probs_bte), np.asarray(task_type_bt)
    b, t, n = probs.shape
    mask = np.ones((b, t), bool) if token_mask_bt is None else np.asarray(token_mask_bt, bool)
    samples = []
    for row in range(b):
        if segment_ids_bt is None:
            samples.append((row, np.arange(t)))
        else:
            seg = np.asarray(segment_ids_bt)[row]
            samples += [(row, np.flatnonzero(seg == s)) for s in sorted(set(seg.tolist()) - {0})]
    z = []
    for row, positions in samples:
        q = sum((probs[row, p] for p in positions if mask[row, p]), np.zeros(n))
        sample_type = types[row, positions].max()
        for expert in range(n):
            matched = sample_type == 1 if expert < n // 2 else sample_type == 0
            z.append(q[expert] * (1 + delta if matched else 1 - delta))
    z = np.asarray(z)
    return z.var(ddof=1) / (z.mean() ** 2 + 1e-10)


def random_probs(seed, shape, scale=2.0):
    return jax.nn.softmax(normal(seed, shape, scale), axis=-1)


def test_lbc_equals_the_per_sample_reference():
    probs_bte = random_probs(0, (4, 7, 6))
    task_type_bt = jnp.asarray(np.repeat([[1], [0], [0], [1]], 7, axis=1))
    for delta in (0.0, 0.1, 0.5):
        got = losses.localized_balancing_loss(probs_bte, task_type_bt, None, None, delta)
        np.testing.assert_allclose(got, reference_lbc(probs_bte, task_type_bt, delta), **TOL)


def test_lbc_counts_padding_like_the_official_code_unless_masked():
    probs_bte = random_probs(1, (3, 8, 4))
    task_type_bt = np.repeat([[1], [0], [1]], 8, axis=1)
    mask_bt = np.ones((3, 8), bool)
    mask_bt[0, 5:] = mask_bt[2, 2:] = False
    task_type_bt = jnp.asarray(np.where(mask_bt, task_type_bt, -1))  # padding carries no type
    unmasked = losses.localized_balancing_loss(probs_bte, task_type_bt, None, None, 0.1)
    masked = losses.localized_balancing_loss(probs_bte, task_type_bt, jnp.asarray(mask_bt), None, 0.1)
    np.testing.assert_allclose(unmasked, reference_lbc(probs_bte, task_type_bt, 0.1), **TOL)
    np.testing.assert_allclose(masked, reference_lbc(probs_bte, task_type_bt, 0.1, token_mask_bt=mask_bt), **TOL)
    assert abs(float(masked) - float(unmasked)) > 1e-3


def test_lbc_treats_each_packed_segment_as_a_sample():
    probs_bte = random_probs(2, (2, 10, 4))
    segment_ids_bt = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0], [1, 1, 1, 1, 1, 1, 2, 2, 0, 0]])
    types_of_segment = {(0, 1): 1, (0, 2): 0, (0, 3): 1, (1, 1): 0, (1, 2): 1}
    task_type_bt = np.full((2, 10), -1)
    for (row, seg), kind in types_of_segment.items():
        task_type_bt[row, segment_ids_bt[row] == seg] = kind
    got = losses.localized_balancing_loss(probs_bte, jnp.asarray(task_type_bt), None, jnp.asarray(segment_ids_bt), 0.2)
    np.testing.assert_allclose(got, reference_lbc(probs_bte, task_type_bt, 0.2, segment_ids_bt=segment_ids_bt), **TOL)
    # Not the same as treating the rows as samples.
    assert abs(float(got) - reference_lbc(probs_bte, np.maximum(task_type_bt, 0), 0.2)) > 1e-3


def test_lbc_is_minimised_by_the_inverse_coefficients():
    """The sign analysis of METHODS.md 1.4: Q proportional to 1/I gives Z constant, so the loss is zero."""
    delta, t = 0.1, 5
    q_row = np.array([1 / (1 + delta)] * 2 + [1 / (1 - delta)] * 2)  # a type-1 sample: first half matched
    probs_bte = jnp.asarray(np.broadcast_to(q_row / q_row.sum(), (1, t, 4)), jnp.float32)
    got = losses.localized_balancing_loss(probs_bte, jnp.ones((1, t), jnp.int32), None, None, delta)
    assert float(got) < 1e-10


def official_loramoe_linear(in_features, out_features, r, lora_alpha, lora_nums, blc_alpha, blc_weight):
    """The forward and cv_squared of LoRAMoE's `peft/tuners/lora.py` `Linear`, transcribed (dropout off)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Linear(nn.Linear):
        def __init__(self):
            nn.Linear.__init__(self, in_features, out_features, bias=False)
            self.lora_num, self.blc_alpha, self.blc_weight = lora_nums, blc_alpha, blc_weight
            self.lora_route = nn.Linear(in_features, self.lora_num, bias=False)
            for i in range(self.lora_num):
                setattr(self, f"lora_A{i}", nn.Linear(in_features, r, bias=False))
                setattr(self, f"lora_B{i}", nn.Linear(r, out_features, bias=False))
            self.scaling = lora_alpha / r
            self.lora_dropout = lambda x: x

        def cv_squared(self, x):
            eps = 1e-10
            if x.shape[0] == 1:
                return torch.tensor([0], device=x.device, dtype=x.dtype)[0]
            return x.float().var() / (x.float().mean() ** 2 + eps)

        def forward(self, x, task_types=None):
            result = F.linear(x, self.weight, bias=self.bias)
            route_weight = nn.functional.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
            for i in range(self.lora_num):
                result = result + torch.unsqueeze(route_weight[:, :, i], -1) * getattr(self, f"lora_B{i}")(
                    getattr(self, f"lora_A{i}")(self.lora_dropout(x))) * self.scaling
            blcls = torch.zeros(1)[0].to(result)
            if task_types is not None:
                if self.blc_weight != 0:
                    task_types = task_types.view(-1, 1)
                    blcls = self.cv_squared((
                        route_weight.sum(dim=(1)) * torch.where(
                            torch.concat(((task_types == 1).repeat(1, self.lora_num // 2),
                                          (task_types == 0).repeat(1, self.lora_num // 2)), dim=-1),
                            1.0 + self.blc_alpha, 1.0 - self.blc_alpha)).flatten()) * self.blc_weight
            return result, blcls

    return Linear()


@pytest.mark.torch
@pytest.mark.parametrize("num_experts", [2, 6])
def test_loramoe_linear_and_lbc_equal_the_official_pytorch_code(num_experts):
    torch = pytest.importorskip("torch")
    d_in, d_out, rank, shape = 12, 10, 4, (3, 5)
    config = AdapterConfig(method="loramoe", target_modules=("up_proj",), rank=rank, alpha=32.0,
                           num_experts=num_experts, lbc_weight=0.1, lbc_delta=0.1)
    module = AdaptedLinear(Linear(d_in, d_out, axes=("embed", "mlp"), use_bias=False, dtype=jnp.float32,
                                  param_dtype=jnp.float32, rngs=nnx.Rngs(0)),
                           "mlp.up_proj", config, num_experts=num_experts, top_k=0, shared_a=False, rngs=nnx.Rngs(1),
                           layers=None)
    randomize_lora_b(module)
    module.router.set_value(module.router[...] * 4)
    official = official_loramoe_linear(d_in, d_out, rank, 32, num_experts, 0.1, 0.1).double()
    with torch.no_grad():
        official.weight.copy_(torch.from_numpy(f64(module.base.kernel[...]).T))
        official.lora_route.weight.copy_(torch.from_numpy(f64(module.router[...]).T))
        for i in range(num_experts):
            getattr(official, f"lora_A{i}").weight.copy_(torch.from_numpy(f64(module.experts.lora_a[...][i]).T))
            getattr(official, f"lora_B{i}").weight.copy_(torch.from_numpy(f64(module.experts.lora_b[...][i]).T))
    x_btd = normal(3, (*shape, d_in))
    task_types_b = np.array([1, 0, 1])
    with torch.no_grad():
        expected_y, expected_blc = official(torch.from_numpy(f64(x_btd)), torch.from_numpy(task_types_b))
    ctx = context(train=True, shape=shape, task_type_bt=jnp.asarray(np.repeat(task_types_b[:, None], 5, 1)))
    np.testing.assert_allclose(module(x_btd, ctx), expected_y.numpy(), **TOL)
    np.testing.assert_allclose(config.lbc_weight * ctx.aux["mlp.up_proj"]["lbc"], float(expected_blc), **TOL)
    # Evaluation (no task types) computes no constraint, as the official code.
    eval_ctx = context(train=False, shape=shape)
    module(x_btd, eval_ctx)
    assert "lbc" not in eval_ctx.aux["mlp.up_proj"]


# ----------------------------------------------------------------------------------------------------------------------
# Switch/Mixtral load balancing.

def mixtral_load_balancing_loss(gate_logits, num_experts, top_k, attention_mask=None):
    """MixLoRA's `_mixtral_load_balancing_loss_func` (as transformers' Mixtral), transcribed to numpy: `gate_logits` is
    a tuple of (batch * seq, experts) per layer."""
    concatenated_gate_logits = np.concatenate(gate_logits, axis=0)
    routing_weights = np_softmax(concatenated_gate_logits)
    selected_experts = np.argsort(-routing_weights, axis=-1)[:, :top_k]
    expert_mask = np.eye(num_experts)[selected_experts]  # (tokens, top_k, experts)
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(0)
        router_prob_per_expert = routing_weights.mean(0)
    else:
        batch_size, sequence_length = attention_mask.shape
        num_hidden_layers = concatenated_gate_logits.shape[0] // (batch_size * sequence_length)
        expert_attention_mask = np.broadcast_to(
            attention_mask[None, :, :, None, None],
            (num_hidden_layers, batch_size, sequence_length, top_k, num_experts)).reshape(-1, top_k, num_experts)
        tokens_per_expert = (expert_mask * expert_attention_mask).sum(0) / expert_attention_mask.sum(0)
        router_per_expert_attention_mask = np.broadcast_to(
            attention_mask[None, :, :, None],
            (num_hidden_layers, batch_size, sequence_length, num_experts)).reshape(-1, num_experts)
        router_prob_per_expert = ((routing_weights * router_per_expert_attention_mask).sum(0)
                                  / router_per_expert_attention_mask.sum(0))
    overall_loss = np.sum(tokens_per_expert * router_prob_per_expert[None, :])
    return overall_loss * num_experts


def stacked_summaries(logits_lbte, top_k, mask_bt):
    """What the layer scan hands finalize_aux for one router: routing_summary of every layer, stacked."""
    per_layer = []
    for logits_bte in logits_lbte:
        probs_bte = jax.nn.softmax(logits_bte, axis=-1)
        _, _, index_btk = topk_weights(probs_bte, top_k, True)
        per_layer.append(routing_summary(probs_bte, index_btk, jnp.asarray(mask_bt)))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


@pytest.mark.parametrize("padded", [False, True])
def test_load_balance_equals_mixtrals_loss_pooled_over_layers_and_routers(padded):
    layers, shape, experts, top_k = 3, (2, 6), 8, 2
    mask_bt = np.ones(shape, bool)
    if padded:
        mask_bt[0, 4:] = mask_bt[1, 1:] = False
    logits = {name: normal(10 + i, (layers, *shape, experts), 1.5) for i, name in enumerate(["q_proj", "v_proj"])}
    aux = {name: stacked_summaries(value, top_k, mask_bt) for name, value in logits.items()}
    config = AdapterConfig(num_experts=experts, top_k=top_k, load_balance_weight=0.01)
    weighted, stats = losses.finalize_aux(aux, config)
    gate_logits = tuple(f64(value[layer]).reshape(-1, experts) for value in logits.values() for layer in range(layers))
    expected = mixtral_load_balancing_loss(gate_logits, experts, top_k, mask_bt.astype(np.float64) if padded else None)
    np.testing.assert_allclose(weighted["load_balance"], 0.01 * expected, **TOL)
    np.testing.assert_allclose(jnp.sum(stats["q_proj"]["load_share"], axis=-1), np.ones(layers), **TOL)


# ----------------------------------------------------------------------------------------------------------------------
# MoELoRA expert contrastive loss.

def reference_contrastive(outputs_enf, valid_n, temperature):
    """InfoNCE with cosine similarity: query = expert e on token n, positive = expert e on the next sampled token
    (cyclic), negatives = the other experts on token n; mean over experts and over tokens whose pair is valid."""
    out = f64(outputs_enf)
    unit = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-8)
    num_experts, num_tokens, _ = out.shape
    total, count = 0.0, 0
    for n in range(num_tokens):
        following = (n + 1) % num_tokens
        if not (valid_n[n] and valid_n[following]):
            continue
        for e in range(num_experts):
            q = unit[e, n]
            positive = np.exp(q @ unit[e, following] / temperature)
            negatives = sum(np.exp(q @ unit[g, n] / temperature) for g in range(num_experts) if g != e)
            total += -np.log(positive / (positive + negatives))
            count += 1
    return total / count


def test_contrastive_loss_equals_the_infonce_loop():
    outputs_enf = normal(20, (4, 9, 6))
    valid_n = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0], bool)
    for temperature in (0.07, 1.0):
        got = losses.expert_contrastive_loss(outputs_enf, jnp.asarray(valid_n), temperature)
        np.testing.assert_allclose(got, reference_contrastive(outputs_enf, valid_n, temperature), rtol=1e-5)


def test_contrastive_loss_in_the_moelora_layer_uses_every_experts_output_on_sampled_real_tokens():
    d_in, d_out, shape, experts = 12, 10, (2, 8), 4
    config = AdapterConfig(method="moelora", target_modules=("q_proj",), rank=3, alpha=6.0, num_experts=experts,
                           top_k=2, contrastive_weight=0.1, contrastive_tokens=6, contrastive_temperature=0.5)
    module = AdaptedLinear(Linear(d_in, d_out, axes=("embed", "heads"), use_bias=False, dtype=jnp.float32,
                                  param_dtype=jnp.float32, rngs=nnx.Rngs(0)),
                           "self_attn.q_proj", config, num_experts=experts, top_k=2, shared_a=False, rngs=nnx.Rngs(1),
                           layers=None)
    randomize_lora_b(module)
    x_btd = normal(21, (*shape, d_in))
    mask_bt = np.ones(shape, bool)
    mask_bt[1, 3:] = False
    ctx = context(train=True, shape=shape, mask_bt=mask_bt, seed=3)
    module(x_btd, ctx)
    # The documented sampling: the `contrastive_tokens` real tokens with the highest uniform scores, in that order.
    scores = np.asarray(jax.random.uniform(ctx.key_for("self_attn.q_proj/contrastive"), (mask_bt.size,)))
    picked = [n for n in np.argsort(-scores) if mask_bt.reshape(-1)[n]][:6]
    x_nd = f64(x_btd).reshape(-1, d_in)[picked]
    a, b = f64(module.experts.lora_a[...]), f64(module.experts.lora_b[...])
    outputs_enf = np.stack([config.scaling * (x_nd @ a[e]) @ b[e] for e in range(experts)])
    expected = reference_contrastive(outputs_enf, np.ones(6, bool), 0.5)
    np.testing.assert_allclose(ctx.aux["self_attn.q_proj"]["contrastive"], expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Weighting and pooling of the per-module, per-layer terms.

def test_finalize_sums_lbc_over_modules_and_layers_each_weighted_by_beta():
    aux = {name: {"lbc": jnp.asarray(values)} for name, values in
           {"mlp.gate_proj": [0.1, 0.2], "mlp.up_proj": [0.3, 0.4], "mlp.down_proj": [0.5, 0.6]}.items()}
    weighted, _ = losses.finalize_aux(aux, AdapterConfig(method="loramoe", num_experts=2, lbc_weight=0.5))
    np.testing.assert_allclose(weighted["lbc"], 0.5 * 2.1, **TOL)


def test_finalize_averages_contrastive_and_sums_l1():
    aux = {"self_attn.q_proj": {"contrastive": jnp.asarray([1.0, 2.0]), "l1": jnp.asarray([1.0, 1.0])},
           "self_attn.v_proj": {"contrastive": jnp.asarray([3.0, 4.0]), "l1": jnp.asarray([2.0, 2.0])}}
    config = AdapterConfig(num_experts=2, contrastive_weight=0.1, l1_weight=0.01)
    weighted, _ = losses.finalize_aux(aux, config)
    np.testing.assert_allclose(weighted["contrastive"], 0.1 * 2.5, **TOL)
    np.testing.assert_allclose(weighted["l1"], 0.01 * 6.0, **TOL)
