"""The Llama-family decoder in Flax NNX: Llama 2/3, TinyLlama, SmolLM2, Mistral, Qwen2 and Qwen3.

Names mirror Hugging Face (`embed_tokens`, `layers.self_attn.q_proj`, `mlp.gate_proj`, `norm`, `lm_head`) so checkpoint
keys and PEFT `target_modules` map one to one. All decoder layers live in one `DecoderLayer` whose parameters are stacked
over a leading `layers` axis; the forward pass scans over it (or unrolls, with `scan_layers=False`).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoelora.adapters.variables import AdapterState
from jaxmoelora.models.config import REMAT_POLICIES, ModelConfig
from jaxmoelora.models.layers import ACTIVATIONS, Embed, Linear, RMSNorm
from jaxmoelora.models.rope import apply_rope, inverse_frequencies, rope_tables


@flax.struct.dataclass
class KVCache:
    """A fixed-size key/value cache for all layers; `index` is the next slot to write."""

    k_lbskh: jax.Array
    v_lbskh: jax.Array
    valid_bs: jax.Array  # which slots hold a real (non-padding) token
    index: jax.Array  # int32 scalar

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, size: int) -> "KVCache":
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype),
                   jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class AttentionContext:
    """Per-call tensors shared by every layer."""

    cos_btd: jax.Array
    sin_btd: jax.Array
    mask_bts: jax.Array  # causal, padding and segment mask (before the per-layer sliding window)
    slot_distance_bts: jax.Array  # query slot - key slot, for sliding windows
    cache_index: jax.Array | None  # where the new keys are written in the cache, or None without cache


@dataclasses.dataclass
class ForwardContext:
    """What the modules of one forward call share. A plain Python object closed over by the layer loop: adapters read
    the token mask, task types and this layer's PRNG key, and put their auxiliary outputs into `aux`."""

    attention: AttentionContext
    train: bool
    token_mask_bt: jax.Array  # real (non-padding) tokens
    segment_ids_bt: jax.Array | None
    task_type_bt: jax.Array | None
    rng: jax.Array | None = None  # this layer's key (training randomness: dropout, merge masks, sampling)
    aux: dict = dataclasses.field(default_factory=dict)  # {module name: {quantity: array}} of this layer

    def key_for(self, name: str) -> jax.Array:
        if self.rng is None:
            raise ValueError("training randomness needs a PRNG key: call the model with rng=jax.random.key(...)")
        return jax.random.fold_in(self.rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None):
        c = config
        common = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs, layers=layers)
        qkv_bias = c.attention_bias or c.qkv_bias
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, axes=("embed", "heads"), use_bias=qkv_bias,
                             **common)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, axes=("embed", "kv_heads"),
                             use_bias=qkv_bias, **common)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, axes=("embed", "kv_heads"),
                             use_bias=qkv_bias, **common)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, axes=("heads", "embed"),
                             use_bias=c.attention_bias, **common)
        if c.qk_norm:
            norm = dict(eps=c.rms_norm_eps, axis_name="head_dim", param_dtype=c.weight_dtype, rngs=rngs, layers=layers)
            self.q_norm = RMSNorm(c.head_dim, **norm)
            self.k_norm = RMSNorm(c.head_dim, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim

    def __call__(self, x_btd: jax.Array, fctx: ForwardContext, window: jax.Array,
                 cache_kv: tuple[jax.Array, jax.Array] | None):
        """Returns the attention output and this call's new (k, v), to be written into the cache by the caller."""
        b, t, _ = x_btd.shape
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        ctx = fctx.attention
        q_btnh = self.q_proj(x_btd, fctx).reshape(b, t, n, h)
        k_btkh = self.k_proj(x_btd, fctx).reshape(b, t, k, h)
        v_btkh = self.v_proj(x_btd, fctx).reshape(b, t, k, h)
        if self.q_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh = apply_rope(q_btnh, ctx.cos_btd, ctx.sin_btd)
        k_btkh = apply_rope(k_btkh, ctx.cos_btd, ctx.sin_btd)
        if cache_kv is None:
            keys_bskh, values_bskh = k_btkh, v_btkh
        else:
            start = (0, ctx.cache_index, 0, 0)
            keys_bskh = jax.lax.dynamic_update_slice(cache_kv[0], k_btkh.astype(cache_kv[0].dtype), start)
            values_bskh = jax.lax.dynamic_update_slice(cache_kv[1], v_btkh.astype(cache_kv[1].dtype), start)
        mask_bts = ctx.mask_bts & ((window <= 0) | (ctx.slot_distance_bts < window))
        if cache_kv is None:
            out_btnh = causal_attention(q_btnh, keys_bskh, values_bskh, mask_bts)
        else:
            out_btnh = cached_attention(q_btnh, keys_bskh, values_bskh, mask_bts)
        return self.o_proj(out_btnh.reshape(b, t, n * h), fctx), (k_btkh, v_btkh)


def _masked_softmax(scores_xts: jax.Array, mask_xts: jax.Array, dtype) -> jax.Array:
    return jax.nn.softmax(jnp.where(mask_xts, scores_xts, jnp.finfo(jnp.float32).min), axis=-1).astype(dtype)


def cached_attention(q_btnh: jax.Array, keys_bskh: jax.Array, values_bskh: jax.Array,
                     mask_bts: jax.Array) -> jax.Array:
    """Grouped-query attention of t new tokens over every slot of a KV cache (any query may see any slot)."""
    b, t, n, h = q_btnh.shape
    k = keys_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, keys_bskh.astype(q_btkgh.dtype),
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    probs_bkgts = _masked_softmax(scores_bkgts, mask_bts[:, None, None], q_btkgh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, values_bskh.astype(q_btkgh.dtype))
    return out_btkgh.reshape(b, t, n, h)


ATTENTION_QUERY_BLOCK = 64  # query rows per block of the causal attention; at most MAX_ATTENTION_BLOCKS blocks
MAX_ATTENTION_BLOCKS = 16


def causal_attention(q_btnh: jax.Array, keys_btkh: jax.Array, values_btkh: jax.Array,
                     mask_btt: jax.Array) -> jax.Array:
    """Grouped-query attention where no query sees a later key (`mask_btt` is causal, plus padding, segments and
    windows), as in training and in a forward without cache.

    The queries are taken in blocks; block [lo, hi) is scored only against keys [0, hi), so the products above the
    diagonal (about half of them for long sequences) are never computed. Heads go first (b, kv head, group, t, h), so
    each product is one batched matmul over (batch, kv head) with the group's queries stacked: on XLA:CPU this is about
    twice as fast as the token-major einsum (fwd+bwd, SmolLM2 shapes). A row whose keys are all masked (a padding
    query) averages over its block's visible keys rather than all keys: its output is never read by a real token.
    """
    b, t, n, h = q_btnh.shape
    k = keys_btkh.shape[2]
    dtype = q_btnh.dtype
    block = max(ATTENTION_QUERY_BLOCK, -(-t // MAX_ATTENTION_BLOCKS))
    q_bkgth = (q_btnh * (h ** -0.5)).reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    keys_bkth = keys_btkh.astype(dtype).transpose(0, 2, 1, 3)
    values_bkth = values_btkh.astype(dtype).transpose(0, 2, 1, 3)
    out_blocks = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        scores_bkgqs = jnp.einsum("bkgqh,bksh->bkgqs", q_bkgth[:, :, :, lo:hi], keys_bkth[:, :, :hi],
                                  preferred_element_type=jnp.float32)
        probs_bkgqs = _masked_softmax(scores_bkgqs, mask_btt[:, None, None, lo:hi, :hi], dtype)
        out_blocks.append(jnp.einsum("bkgqs,bksh->bkgqh", probs_bkgqs, values_bkth[:, :, :hi]))
    out_bkgth = jnp.concatenate(out_blocks, axis=3)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None):
        c = config
        common = dict(use_bias=c.mlp_bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs, layers=layers)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **common)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **common)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, axes=("mlp", "embed"), **common)
        self.act = ACTIVATIONS[c.hidden_act]

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext | None = None) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x_btd, ctx)) * self.up_proj(x_btd, ctx), ctx)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        norm = dict(eps=config.rms_norm_eps, axis_name="embed", param_dtype=config.weight_dtype, rngs=rngs,
                    layers=layers)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, rngs=rngs, layers=layers)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, rngs=rngs, layers=layers)

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, window: jax.Array, cache_kv=None):
        attn_btd, new_kv = self.self_attn(self.input_layernorm(x_btd), ctx, window, cache_kv)
        x_btd = x_btd + attn_btd
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd), ctx)
        return x_btd, new_kv


@flax.struct.dataclass
class DecoderOutput:
    logits_btv: jax.Array  # fp32
    cache: KVCache | None
    hidden_btd: jax.Array  # final hidden states after the last norm
    aux_losses: dict  # {name: weighted scalar} from the adapters; their sum joins the training loss
    router_stats: dict  # {module: {statistic: per-layer array}} for logging


class CausalLM(nnx.Module):
    """A decoder-only language model: `model(input_ids_bt, ...) -> DecoderOutput` with fp32 logits."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.adapter_config = None  # set by jaxmoelora.adapters.apply_adapters
        c = config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                                  rngs=rngs)
        self.layers = DecoderLayer(c, rngs=rngs, layers=c.num_layers)
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, axis_name="embed", param_dtype=c.weight_dtype,
                            rngs=rngs)
        self.lm_head = None if c.tie_word_embeddings else Linear(
            c.hidden_size, c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=c.compute_dtype,
            param_dtype=c.weight_dtype, rngs=rngs)

    def __call__(self, input_ids_bt: jax.Array, *, positions_bt: jax.Array | None = None,
                 attention_mask_bt: jax.Array | None = None, segment_ids_bt: jax.Array | None = None,
                 cache: KVCache | None = None, train: bool = False, rng: jax.Array | None = None,
                 task_type_bt: jax.Array | None = None) -> DecoderOutput:
        """Runs the decoder.

        attention_mask_bt marks real tokens (1) and padding (0); positions default to the count of real tokens before
        each one (left padding works as in `generate`); segment_ids_bt (packed sequences) keeps attention within equal
        ids. With a cache, the tokens are written at `cache.index` and attend to every valid slot before them.
        """
        b, t = input_ids_bt.shape
        c = self.config
        valid_bt = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        if positions_bt is None:
            offset = 0 if cache is None else jnp.sum(cache.valid_bs, axis=1, keepdims=True)
            positions_bt = jnp.maximum(jnp.cumsum(valid_bt, axis=1) - 1 + offset, 0)
        if cache is None:
            index = jnp.zeros((), jnp.int32)
            key_valid_bs = valid_bt
            size = t
        else:
            index = cache.index
            key_valid_bs = jax.lax.dynamic_update_slice(cache.valid_bs, valid_bt, (0, index))
            size = cache.valid_bs.shape[1]
        query_slot_t = index + jnp.arange(t)
        distance_ts = query_slot_t[:, None] - jnp.arange(size)[None, :]
        mask_bts = key_valid_bs[:, None, :] & (distance_ts >= 0)[None]
        if segment_ids_bt is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            mask_bts = mask_bts & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
        cos_btd, sin_btd = rope_tables(positions_bt, inverse_frequencies(c), c.compute_dtype)
        attention = AttentionContext(cos_btd, sin_btd, mask_bts, jnp.broadcast_to(distance_ts, (b, t, size)),
                                     None if cache is None else index)
        token_mask_bt = valid_bt if segment_ids_bt is None else valid_bt & (segment_ids_bt > 0)
        ctx = ForwardContext(attention, train, token_mask_bt, segment_ids_bt, task_type_bt, rng)

        x_btd = self.embed_tokens(input_ids_bt)
        x_btd, new_k_lbtkh, new_v_lbtkh, aux_l = self._run_layers(x_btd, ctx, cache)
        hidden_btd = self.norm(x_btd)
        if self.lm_head is None:
            logits_btv = self.embed_tokens.attend(hidden_btd)
        else:
            logits_btv = self.lm_head(hidden_btd)
        new_cache = None
        if cache is not None:
            start = (0, 0, index, 0, 0)
            new_cache = KVCache(
                jax.lax.dynamic_update_slice(cache.k_lbskh, new_k_lbtkh.astype(cache.k_lbskh.dtype), start),
                jax.lax.dynamic_update_slice(cache.v_lbskh, new_v_lbtkh.astype(cache.v_lbskh.dtype), start),
                key_valid_bs, index + t)
        aux_losses, router_stats = {}, {}
        if self.adapter_config is not None:
            from jaxmoelora.adapters.losses import finalize_aux
            aux_losses, router_stats = finalize_aux(aux_l, self.adapter_config)
        return DecoderOutput(logits_btv.astype(jnp.float32), new_cache, hidden_btd, aux_losses, router_stats)

    def head_weight_vd(self) -> jax.Array:
        """The output projection as (vocab, hidden): logits = hidden @ head.T (the tied embedding or lm_head)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...]
        return self.lm_head.kernel[...].T

    def _run_layers(self, x_btd: jax.Array, ctx: ForwardContext, cache: KVCache | None):
        """Applies every decoder layer; returns the output, each layer's new keys and values, and the adapters'
        per-layer auxiliary outputs (stacked over layers). Adapter state changed in training (SLIM's clusters) is
        written back into `self.layers`."""
        graphdef, layer_state = nnx.split(self.layers)
        windows_l = jnp.asarray(self.config.windows, jnp.int32)
        num_layers = self.config.num_layers
        keys_l = None if ctx.rng is None else jax.random.split(ctx.rng, num_layers)

        def one_layer(x_btd, per_layer):
            state, window, cache_kv, key = per_layer
            layer = nnx.merge(graphdef, state)
            layer_ctx = dataclasses.replace(ctx, rng=key, aux={})
            x_btd, (k_btkh, v_btkh) = layer(x_btd, layer_ctx, window, cache_kv)
            new_adapter_state = nnx.state(layer, AdapterState) if ctx.train else None
            return x_btd, ((k_btkh, v_btkh), layer_ctx.aux, new_adapter_state)

        if self.config.remat:
            policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[self.config.remat_policy])
            one_layer = jax.checkpoint(one_layer, prevent_cse=not self.config.scan_layers, policy=policy)
        cache_kv = None if cache is None else (cache.k_lbskh, cache.v_lbskh)
        xs = (layer_state, windows_l, cache_kv, keys_l)
        # Unrolled (scan_layers=False) compiles each layer separately: compile time grows with depth, but XLA may
        # schedule across layers.
        unroll = 1 if self.config.scan_layers else num_layers
        x_btd, ((k_lbtkh, v_lbtkh), aux_l, adapter_state_l) = jax.lax.scan(one_layer, x_btd, xs, unroll=unroll)
        if ctx.train and jax.tree.leaves(adapter_state_l):
            nnx.update(self.layers, adapter_state_l)
        return x_btd, k_lbtkh, v_lbtkh, aux_l


def init_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialised model (tests, benchmarks); real weights come from `jaxmoelora.from_pretrained`."""
    return CausalLM(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> CausalLM:
    """The model's structure with `jax.ShapeDtypeStruct` leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module, filter_: Any = nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, filter_)))
