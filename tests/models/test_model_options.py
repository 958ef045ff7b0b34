"""Model options and the forward contract: scanned vs unrolled layers, remat, bf16, the KV cache, packed segments,
grouped-query attention, and what `ModelConfig.from_hf` accepts and rejects."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from jaxmoelora.errors import ConfigError, UnsupportedArchitectureError
from jaxmoelora.loading.pretrained import from_pretrained
from jaxmoelora.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from jaxmoelora.models.decoder import KVCache, abstract_model

VOCAB, SEQ = 128, 12  # the tiny_llama_dir checkpoint (tests/conftest.py): 4 heads, 2 kv heads, head_dim 16


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return from_pretrained(tiny_llama_dir)


def padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows: unpadded, 4 tokens of left padding, 2 tokens of right padding."""
    rng = np.random.default_rng(seed)
    ids_bt = rng.integers(3, VOCAB, size=(3, SEQ)).astype(np.int32)
    mask_bt = np.ones((3, SEQ), bool)
    mask_bt[1, :4] = False
    mask_bt[2, -2:] = False
    ids_bt[~mask_bt] = 0
    return ids_bt, mask_bt


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids_bt, mask_bt, positions_bt, segment_ids_bt):
    return nnx.merge(graphdef, state)(ids_bt, attention_mask_bt=mask_bt, positions_bt=positions_bt,
                                      segment_ids_bt=segment_ids_bt)


def forward(model, ids_bt, mask_bt=None, *, positions_bt=None, segment_ids_bt=None):
    """The model's output from a jitted call (an eager call would compile op by op)."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, ids_bt, mask_bt, positions_bt, segment_ids_bt)


def logits_of(model, ids_bt, mask_bt=None, **kwargs) -> np.ndarray:
    return np.asarray(forward(model, ids_bt, mask_bt, **kwargs).logits_btv)


def with_config(model, **changes):
    """`model`'s weights under a config that differs in `changes` (shapes unchanged)."""
    graphdef, _ = nnx.split(abstract_model(model.config.replace(**changes)))
    return nnx.merge(graphdef, nnx.state(model))


def max_diff(a, b, mask_bt=None) -> float:
    diff = np.abs(np.asarray(a) - np.asarray(b))
    return float((diff[mask_bt] if mask_bt is not None else diff).max())


# ----- scanned vs unrolled layers, remat ------------------------------------------------------------------------------

def test_unrolled_layers_give_the_scanned_logits(model, tiny_llama_dir):
    unrolled = from_pretrained(tiny_llama_dir, scan_layers=False)
    assert model.config.scan_layers and not unrolled.config.scan_layers
    ids_bt, mask_bt = padded_batch()
    assert max_diff(logits_of(model, ids_bt, mask_bt), logits_of(unrolled, ids_bt, mask_bt), mask_bt) <= 1e-5


def loss_and_grads(model, ids_bt, mask_bt):
    """Next-token cross-entropy and its gradient w.r.t. every base parameter."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits_btv = nnx.merge(graphdef, params, rest)(ids_bt, attention_mask_bt=mask_bt).logits_btv
        losses_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1], ids_bt[:, 1:])
        weights_bt = mask_bt[:, 1:] & mask_bt[:, :-1]
        return jnp.sum(losses_bt * weights_bt) / jnp.sum(weights_bt)

    traced = jax.jit(jax.value_and_grad(loss_fn)).trace(params)
    return traced.lower().compile()(params), traced.jaxpr


def test_remat_gives_the_same_loss_and_gradients_scanned_or_unrolled(tiny_llama_dir):
    """Recomputing whole layers (scanned or unrolled) or keeping the projections' outputs ("save_dots")."""
    ids_bt, mask_bt = (jnp.asarray(a) for a in padded_batch())
    (loss, grads), plain_jaxpr = loss_and_grads(from_pretrained(tiny_llama_dir), ids_bt, mask_bt)
    assert "checkpoint" not in str(plain_jaxpr) and "remat" not in str(plain_jaxpr)
    flat = nnx.to_flat_state(grads)
    assert len(flat) >= 11 and all(np.abs(np.asarray(g.get_value())).max() > 0 for _, g in flat)
    for scan_layers, policy in ((True, "full"), (False, "full"), (True, "save_dots")):
        remat = from_pretrained(tiny_llama_dir, scan_layers=scan_layers, remat=True, remat_policy=policy)
        (remat_loss, remat_grads), remat_jaxpr = loss_and_grads(remat, ids_bt, mask_bt)
        assert "checkpoint" in str(remat_jaxpr) or "remat" in str(remat_jaxpr)
        np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
        remat_flat = nnx.to_flat_state(remat_grads)
        assert [p for p, _ in remat_flat] == [p for p, _ in flat]
        for (path, g), (_, rg) in zip(flat, remat_flat):
            np.testing.assert_allclose(rg.get_value(), g.get_value(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{path} scan_layers={scan_layers} policy={policy}")


def test_unknown_remat_policy_is_rejected(tiny_llama_dir):
    with pytest.raises(ConfigError, match="remat_policy='everything' is unknown; use one of"):
        from_pretrained(tiny_llama_dir, remat=True, remat_policy="everything")


# ----- dtypes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"], ids=["bf16-weights", "fp32-weights"])
def test_bf16_compute_stays_close_to_fp32_and_returns_fp32_logits(model, tiny_llama_dir, param_dtype):
    bf16 = from_pretrained(tiny_llama_dir, dtype="bfloat16", param_dtype=param_dtype)
    assert bf16.config.compute_dtype == jnp.bfloat16
    assert bf16.layers.mlp.up_proj.kernel[...].dtype == jnp.dtype(param_dtype)
    ids_bt, mask_bt = padded_batch()
    out = forward(bf16, ids_bt, mask_bt)
    assert out.logits_btv.dtype == jnp.float32
    assert out.hidden_btd.dtype == jnp.bfloat16
    reference = logits_of(model, ids_bt, mask_bt)
    scale = np.abs(reference[mask_bt]).max()
    assert max_diff(out.logits_btv, reference, mask_bt) <= 0.05 * scale
    agree = (np.asarray(out.logits_btv).argmax(-1) == reference.argmax(-1))[mask_bt].mean()
    assert agree >= 0.9


def test_unknown_dtype_is_a_config_error(tiny_llama_dir):
    with pytest.raises(ConfigError, match="float8.*bfloat16"):
        from_pretrained(tiny_llama_dir, dtype="float8")


# ----- KV cache -------------------------------------------------------------------------------------------------------

def test_incremental_decoding_with_the_cache_equals_the_full_forward(model):
    """Prefill 5 columns (one row left padded), then 2 columns at once, then one token at a time; layer 0 has a
    sliding window of 3 tokens, layer 1 attends to everything."""
    m = with_config(model, sliding_windows=(3, 0))
    ids_bt, mask_bt = padded_batch()
    mask_bt[2] = True  # right padding cannot continue; make every row's tail real
    full_btv = logits_of(m, ids_bt, mask_bt)
    cache = KVCache.zeros(m.config, batch=3, size=16)
    step = jax.jit(lambda ids, mask, cache: m(ids, attention_mask_bt=mask, cache=cache))
    pieces, start = [], 0
    for width in [5, 2] + [1] * (SEQ - 7):
        out = step(jnp.asarray(ids_bt[:, start:start + width]), jnp.asarray(mask_bt[:, start:start + width]), cache)
        pieces.append(np.asarray(out.logits_btv))
        cache, start = out.cache, start + width
    assert int(cache.index) == SEQ
    incremental_btv = np.concatenate(pieces, axis=1)
    assert max_diff(incremental_btv, full_btv, mask_bt) <= 1e-5


# ----- packed sequences -----------------------------------------------------------------------------------------------

def test_packed_segments_equal_each_segment_run_alone(model):
    rng = np.random.default_rng(2)
    lengths = [5, 4, 2]
    segments = [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]
    ids_bt = np.asarray([sum(segments, []) + [0]], np.int32)  # one padding token at the end (segment 0)
    segment_ids_bt = np.asarray([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0]], np.int32)
    positions_bt = np.asarray([sum((list(range(n)) for n in lengths), []) + [0]], np.int32)
    packed_btv = logits_of(model, ids_bt, segment_ids_bt=segment_ids_bt, positions_bt=positions_bt)
    start = 0
    for segment in segments:
        # Alone, right padded to the same width (one compilation): causal attention hides the padding.
        alone_bt = np.zeros_like(ids_bt)
        alone_bt[0, :len(segment)] = segment
        alone_btv = logits_of(model, alone_bt, alone_bt > 0)
        assert max_diff(packed_btv[0, start:start + len(segment)], alone_btv[0, :len(segment)]) <= 1e-5
        start += len(segment)
    # Without the segment ids the later segments would see the earlier ones.
    unpacked_btv = logits_of(model, ids_bt, positions_bt=positions_bt)
    assert max_diff(unpacked_btv[0, 5:11], packed_btv[0, 5:11]) > 1e-3


# ----- grouped-query attention ----------------------------------------------------------------------------------------

def test_grouped_query_attention_equals_attention_with_repeated_kv_heads(model):
    """4 query heads on 2 kv heads = 4 kv heads where heads 2i and 2i+1 hold kv head i (transformers' repeat_kv)."""
    c = model.config
    assert (c.num_heads, c.num_kv_heads) == (4, 2)
    group = c.num_heads // c.num_kv_heads
    mha_graphdef, mha_state = nnx.split(abstract_model(c.replace(num_kv_heads=c.num_heads)))
    values = nnx.to_pure_dict(nnx.state(model))
    for name in ("k_proj", "v_proj"):
        kernel = np.asarray(values["layers"]["self_attn"][name]["kernel"])  # (layers, embed, kv_heads * head_dim)
        per_head = kernel.reshape(*kernel.shape[:2], c.num_kv_heads, c.head_dim)
        repeated = np.repeat(per_head, group, axis=2).reshape(*kernel.shape[:2], c.num_heads * c.head_dim)
        values["layers"]["self_attn"][name]["kernel"] = jnp.asarray(repeated)
    nnx.replace_by_pure_dict(mha_state, values)
    mha = nnx.merge(mha_graphdef, mha_state)
    ids_bt, mask_bt = padded_batch()
    assert max_diff(logits_of(mha, ids_bt, mask_bt), logits_of(model, ids_bt, mask_bt), mask_bt) <= 1e-5


# ----- reading Hugging Face configs -----------------------------------------------------------------------------------

HF_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2)


def test_from_hf_reads_the_family_differences():
    llama = ModelConfig.from_hf(transformers.LlamaConfig(
        **HF_SHAPE, architectures=["LlamaForCausalLM"], eos_token_id=[2, 3], rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64)))
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert (llama.rope_type, llama.rope_theta, dict(llama.rope_scaling)["factor"]) == ("llama3", 500000.0, 8.0)
    assert (llama.eos_token_ids, llama.rms_norm_eps, llama.windows) == ((2, 3), 1e-6, (0, 0, 0, 0))
    mistral = ModelConfig.from_hf(transformers.MistralConfig(**HF_SHAPE, sliding_window=8,
                                                             architectures=["MistralForCausalLM"]))
    assert mistral.windows == (8, 8, 8, 8)
    qwen2 = ModelConfig.from_hf(transformers.Qwen2Config(**HF_SHAPE, architectures=["Qwen2ForCausalLM"]))
    assert qwen2.qkv_bias and not qwen2.attention_bias and qwen2.windows == (0, 0, 0, 0)
    qwen3 = ModelConfig.from_hf(transformers.Qwen3Config(**HF_SHAPE, head_dim=32, architectures=["Qwen3ForCausalLM"]))
    assert qwen3.qk_norm and qwen3.head_dim == 32


def test_from_hf_rejects_an_unsupported_architecture_and_names_the_supported_ones():
    gpt2 = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as error:
        ModelConfig.from_hf(gpt2)
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)


def test_from_hf_rejects_an_unsupported_rope_type():
    yarn = transformers.LlamaConfig(**HF_SHAPE, architectures=["LlamaForCausalLM"],
                                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                         original_max_position_embeddings=64))
    with pytest.raises(ConfigError, match="'yarn'.*llama3"):
        ModelConfig.from_hf(yarn)


def test_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ConfigError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4)
