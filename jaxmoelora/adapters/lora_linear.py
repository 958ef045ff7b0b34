"""A frozen linear with a mixture of LoRA experts beside it: plain LoRA, LoRAMoE, MoELoRA, MoRAL and HydraLoRA.

    y = W0 x + s * sum_e w_e(x) B_e A_e dropout_e(x)          (LoRAMoE [code peft/tuners/lora.py] and its kin)

The experts are one stacked matmul: x @ A_(d, E*r) gives every expert's rank-r code at the cost of a rank E*r LoRA; the
router weights scale each expert's block (zeros outside the top-k), and @ B_(E*r, f) mixes them. Dense and top-k routing
therefore cost the same, and the frozen projection W0 x is computed once for all experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoelora.adapters.config import AdapterConfig
from jaxmoelora.adapters.fast_random import expert_keep_masks, mask_seed
from jaxmoelora.adapters.initializers import make_initializer
from jaxmoelora.adapters.merging import merge_masks
from jaxmoelora.adapters.routing import router_probs, routing_summary, topk_weights
from jaxmoelora.adapters.variables import ExpertParam, RouterParam
from jaxmoelora.models.layers import Linear, stacked_param


# Tokens per step of the dropout loop (batch x time window): the experts' masked copies of a window stay in cache.
DROPOUT_WINDOW_TOKENS = 128


def expert_dropout(key: jax.Array, x_btd: jax.Array, rate: float, num_experts: int) -> jax.Array:
    """Independent inverted-dropout copies of x, one per expert: (experts, batch, time, d)."""
    keeps = expert_keep_masks(mask_seed(key), num_experts, 1.0 - rate, x_btd.shape)
    return jnp.stack([jnp.where(keep, x_btd / (1.0 - rate), 0).astype(x_btd.dtype) for keep in keeps])


def lora_codes(x_btd: jax.Array, a_edr: jax.Array, *, key: jax.Array | None, dropout: float,
               num_experts: int | None = None) -> jax.Array:
    """x A_e for every expert: (batch, time, experts, rank); per-expert dropout when `key` is given.

    With one shared A (HydraLoRA) and `num_experts` B heads, each head still sees its own dropout mask, as the official
    code calls `lora_dropout(x)` inside its loop over heads; without dropout the one code is returned (experts = 1)."""
    num_experts = num_experts or a_edr.shape[0]
    a_edr = a_edr.astype(x_btd.dtype)
    if key is not None and dropout > 0:
        return dropped_out_codes(x_btd, a_edr, mask_seed(key), dropout, num_experts)
    return jnp.einsum("btd,edr->bter", x_btd, a_edr)


def _time_window(batch: int, time: int) -> int:
    """The largest divisor of `time` whose window holds at most DROPOUT_WINDOW_TOKENS tokens (at least 1)."""
    best = 1
    for size in range(1, time + 1):
        if time % size == 0 and batch * size <= DROPOUT_WINDOW_TOKENS:
            best = size
    return best


def _windows(array_bt_: jax.Array, window: int) -> jax.Array:
    """(batch, time, ...) -> (time // window, batch, window, ...): the loop axis first, the batch axis kept whole so
    its sharding carries through."""
    b, t = array_bt_.shape[:2]
    return jnp.moveaxis(array_bt_.reshape(b, t // window, window, *array_bt_.shape[2:]), 1, 0)


def _unwindow(array_nbw_: jax.Array) -> jax.Array:
    n, b, w = array_nbw_.shape[:3]
    return jnp.moveaxis(array_nbw_, 0, 1).reshape(b, n * w, *array_nbw_.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dropped_out_codes(x_btd: jax.Array, a_edr: jax.Array, seed: jax.Array, rate: float, num_experts: int):
    """dropout_e(x) A_e for every expert: (batch, time, experts, rank), the masks of `expert_dropout`.

    A loop over time windows of about DROPOUT_WINDOW_TOKENS tokens: each window's E masks and masked copies of x are
    made in cache, used by E 2-D matmuls and dropped; nothing of size E x tokens x d is ever written to memory. The
    backward makes the same masks again from the seed and orders each A gradient with the rank-sized cotangent on the
    left."""
    return _dropped_out_codes_fwd(x_btd, a_edr, seed, rate, num_experts)[0]


def _dropped_out_codes_fwd(x_btd, a_edr, seed, rate, num_experts):
    b, t, _ = x_btd.shape
    window = _time_window(b, t)
    scale = 1.0 / (1.0 - rate)

    def window_codes(inputs):
        x_bwd, start = inputs
        keeps = expert_keep_masks(seed, num_experts, 1.0 - rate, x_btd.shape, start, window)
        return jnp.stack([jnp.where(keeps[e], x_bwd * scale, 0).astype(x_btd.dtype) @ a_edr[e % a_edr.shape[0]]
                          for e in range(num_experts)], axis=2)

    codes_nbwer = jax.lax.map(window_codes, (_windows(x_btd, window), jnp.arange(0, t, window, dtype=jnp.uint32)))
    return _unwindow(codes_nbwer), (x_btd, a_edr, seed)


def _dropped_out_codes_bwd(rate, num_experts, residuals, g_bter):
    x_btd, a_edr, seed = residuals
    b, t, _ = x_btd.shape
    window = _time_window(b, t)
    scale = 1.0 / (1.0 - rate)

    def window_grads(g_a_erd, inputs):
        x_bwd, g_bwer, start = inputs
        keeps = expert_keep_masks(seed, num_experts, 1.0 - rate, x_btd.shape, start, window)
        g_a = list(g_a_erd)
        g_x_bwd = jnp.zeros(x_bwd.shape, jnp.float32)
        for e in range(num_experts):
            shared = e % a_edr.shape[0]
            dropped_x_bwd = jnp.where(keeps[e], x_bwd, 0)
            g_a[shared] = g_a[shared] + jnp.einsum("bwr,bwd->rd", g_bwer[:, :, e], dropped_x_bwd,
                                                   preferred_element_type=jnp.float32)
            g_x_bwd = g_x_bwd + jnp.where(keeps[e], g_bwer[:, :, e] @ a_edr[shared].T, 0)
        return jnp.stack(g_a), (g_x_bwd * scale).astype(x_btd.dtype)

    g_a_erd = jnp.zeros((a_edr.shape[0], a_edr.shape[2], a_edr.shape[1]), jnp.float32)
    g_a_erd, g_x_nbwd = jax.lax.scan(window_grads, g_a_erd, (
        _windows(x_btd, window), _windows(g_bter, window), jnp.arange(0, t, window, dtype=jnp.uint32)))
    return _unwindow(g_x_nbwd), (g_a_erd * scale).transpose(0, 2, 1).astype(a_edr.dtype), None


dropped_out_codes.defvjp(_dropped_out_codes_fwd, _dropped_out_codes_bwd)


@jax.custom_vjp
def expert_outputs(codes_bter: jax.Array, b_erf: jax.Array) -> jax.Array:
    """sum_e codes_e B_e: (batch, time, d_out)."""
    return jnp.einsum("bter,erf->btf", codes_bter, b_erf)


def _expert_outputs_fwd(codes_bter, b_erf):
    return expert_outputs(codes_bter, b_erf), (codes_bter, b_erf)


def _expert_outputs_bwd(residuals, g_btf):
    codes_bter, b_erf = residuals
    # B's gradient with the rank-sized codes as the left operand. The transpose rule of dot_general puts the
    # (tokens, d_out) cotangent on the left instead, and XLA:CPU then writes that cotangent out transposed, fused with
    # whatever produced it: a strided copy that cost more than all the adapter matmuls together.
    g_b_erf = jnp.einsum("bter,btf->erf", codes_bter, g_btf)
    return jnp.einsum("btf,erf->bter", g_btf, b_erf), g_b_erf.astype(b_erf.dtype)


expert_outputs.defvjp(_expert_outputs_fwd, _expert_outputs_bwd)


class LoRAExperts(nnx.Module):
    """The stacked factors A (experts, d_in, r) and B (experts, r, d_out); HydraLoRA shares one A."""

    def __init__(self, d_in: int, d_out: int, num_experts: int, config: AdapterConfig, *, rngs: nnx.Rngs,
                 layers: int | None, in_axis: str | None, out_axis: str | None, shared_a: bool = False):
        num_a = 1 if shared_a else num_experts
        init_a = make_initializer(config.init_a, d_in)
        init_b = make_initializer(config.init_b, config.rank)
        self.lora_a = stacked_param(rngs, init_a, (num_a, d_in, config.rank), ("expert", in_axis, "lora_rank"),
                                    jnp.float32, layers, ExpertParam)
        self.lora_b = stacked_param(rngs, init_b, (num_experts, config.rank, d_out),
                                    ("expert", "lora_rank", out_axis), jnp.float32, layers, ExpertParam)
        self.num_experts, self.rank = num_experts, config.rank

    def factors(self, key: jax.Array | None, config: AdapterConfig) -> tuple[jax.Array, jax.Array]:
        """A and B, with SLIM's dynamic-merging masks applied when `key` is given."""
        a_edr, b_erf = self.lora_a[...], self.lora_b[...]
        if key is not None and config.merge_drop_rate > 0:
            keep_in_ed, keep_out_ef = merge_masks(key, self.num_experts, a_edr.shape[1], b_erf.shape[2],
                                                  config.merge_drop_rate, config.merge_rescale)
            a_edr = a_edr * keep_in_ed[:, :, None]
            b_erf = b_erf * keep_out_ef[:, None, :]
        return a_edr, b_erf

    def l1(self) -> jax.Array:
        """SLIM's L1 term: sum over experts of |B|_1 / (r * C_out) + |A|_1 / (r * C_in)."""
        a_edr, b_erf = self.lora_a[...], self.lora_b[...]
        return (jnp.sum(jnp.abs(b_erf)) / (self.rank * b_erf.shape[-1])
                + jnp.sum(jnp.abs(a_edr)) / (self.rank * a_edr.shape[1]))


class AdaptedLinear(nnx.Module):
    """Wraps a frozen `Linear` (its kernel is shared, never copied) with LoRA experts and an optional router."""

    def __init__(self, base: Linear, name: str, config: AdapterConfig, *, num_experts: int, top_k: int,
                 shared_a: bool, rngs: nnx.Rngs, layers: int | None):
        kernel = base.kernel
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        in_axis, out_axis = kernel.get_metadata()["logical_axes"][-2:]
        self.base = base
        self.name = name
        self.config = config
        self.top_k = top_k
        self.experts = LoRAExperts(d_in, d_out, num_experts, config, rngs=rngs, layers=layers, in_axis=in_axis,
                                   out_axis=out_axis, shared_a=shared_a)
        # Stored (d_in, experts); kaiming bounds use fan_in = d_in as torch's (experts, d_in) weight does.
        init = make_initializer(config.router_init, d_in, config.router_init_range)
        self.router = stacked_param(rngs, init, (d_in, num_experts), (in_axis, "expert"), jnp.float32, layers,
                                    RouterParam) if num_experts > 1 else None
        self.merged = False

    def __call__(self, x_btd: jax.Array, ctx=None) -> jax.Array:
        y_btf = self.base(x_btd)
        if self.merged:
            return y_btf
        config = self.config
        train = ctx is not None and ctx.train
        x_btd = x_btd.astype(y_btf.dtype)
        merge_key = None
        if config.merge_drop_rate > 0 and (train or config.merge_at_inference) and ctx is not None:
            merge_key = ctx.key_for(self.name + "/merge")
        a_edr, b_erf = self.experts.factors(merge_key, config)
        dropout_key = ctx.key_for(self.name + "/dropout") if train and config.dropout > 0 else None
        codes_bter = lora_codes(x_btd, a_edr, key=dropout_key, dropout=config.dropout, num_experts=b_erf.shape[0])
        if codes_bter.shape[2] != b_erf.shape[0]:  # HydraLoRA: one A code shared by every B head
            codes_bter = jnp.broadcast_to(codes_bter, (*codes_bter.shape[:2], b_erf.shape[0], codes_bter.shape[3]))
        if self.router is not None:
            logits_bte, probs_bte = router_probs(x_btd, self.router[...])
            if self.top_k:
                weights_bte, _, index_btk = topk_weights(probs_bte, self.top_k, config.renormalize_topk)
            else:
                weights_bte, index_btk = probs_bte, None
            if ctx is not None:
                self._record_aux(ctx, probs_bte, index_btk, codes_bter, b_erf)
            codes_bter = codes_bter * weights_bte.astype(codes_bter.dtype)[..., None]
        elif ctx is not None and config.l1_weight:
            ctx.aux[self.name] = {"l1": self.experts.l1()}
        delta_btf = expert_outputs(codes_bter, b_erf.astype(codes_bter.dtype))
        return y_btf + (config.scaling * delta_btf).astype(y_btf.dtype)

    def _record_aux(self, ctx, probs_bte, index_btk, codes_bter, b_erf) -> None:
        from jaxmoelora.adapters import losses
        config = self.config
        aux = routing_summary(probs_bte, index_btk, ctx.token_mask_bt)
        if ctx.train and config.lbc_weight and ctx.task_type_bt is not None:
            aux["lbc"] = losses.localized_balancing_loss(
                probs_bte, ctx.task_type_bt, ctx.token_mask_bt if config.lbc_mask_padding else None,
                ctx.segment_ids_bt, config.lbc_delta)
        if ctx.train and config.contrastive_weight:
            aux["contrastive"] = losses.sampled_expert_contrastive_loss(
                ctx.key_for(self.name + "/contrastive"), codes_bter, b_erf, ctx.token_mask_bt,
                config.contrastive_tokens, config.contrastive_temperature, config.scaling)
        if config.l1_weight:
            aux["l1"] = self.experts.l1()
        ctx.aux[self.name] = aux
