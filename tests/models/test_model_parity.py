"""Parity with transformers' PyTorch models on tiny random checkpoints of each family, saved and loaded from disk.

Each family is made by transformers itself (its config class and model), its weights redrawn from N(0, 0.1) so the
logits are far from uniform, saved with `save_pretrained`, and loaded with `jaxmoelora.from_pretrained`. Logits must
agree within 1e-4 (fp32) on a batch with left and right padding, and greedy decoding must give the same 16 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the PyTorch reference (Python 3.11 only here)")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxmoelora.generation import GenerationConfig, generate_ids, left_pad  # noqa: E402
from jaxmoelora.loading.pretrained import from_pretrained  # noqa: E402
from jaxmoelora.models.decoder import abstract_model  # noqa: E402

pytestmark = pytest.mark.torch

VOCAB, SEQ, NEW_TOKENS = 128, 12, 16
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=None, pad_token_id=0)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # small original context: both scaled and smoothed bands occur

FAMILIES = {
    "llama3-rope-untied": lambda: transformers.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE,
                                                           tie_word_embeddings=False),
    "llama-tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True,
                                                   rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
    # A window of 4 tokens on a 12-token sequence: most queries lose some keys to it.
    "mistral-sliding-window": lambda: transformers.MistralConfig(**COMMON, sliding_window=4,
                                                                 tie_word_embeddings=False),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
    # head_dim 24 while hidden / heads = 16.
    "qwen3-qk-norm": lambda: transformers.Qwen3Config(**{**COMMON, "head_dim": 24}, tie_word_embeddings=False),
}
MODEL_CLASSES = {"LlamaConfig": transformers.LlamaForCausalLM, "MistralConfig": transformers.MistralForCausalLM,
                 "Qwen2Config": transformers.Qwen2ForCausalLM, "Qwen3Config": transformers.Qwen3ForCausalLM}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a shared 2-core machine torch's second OpenMP thread mostly waits for the busy core; one is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved directory, family name)."""
    hf_config = FAMILIES[request.param]()
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = MODEL_CLASSES[type(hf_config).__name__](hf_config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return hf_model, from_pretrained(directory), request.param


def padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of SEQ tokens: unpadded, 5 tokens of left padding, 3 tokens of right padding."""
    rng = np.random.default_rng(seed)
    ids_bt = rng.integers(3, VOCAB, size=(3, SEQ)).astype(np.int32)
    mask_bt = np.ones((3, SEQ), bool)
    mask_bt[1, :5] = False
    mask_bt[2, -3:] = False
    ids_bt[~mask_bt] = 0
    return ids_bt, mask_bt


def hf_logits(hf_model, ids_bt: np.ndarray, mask_bt: np.ndarray) -> np.ndarray:
    positions_bt = np.maximum(np.cumsum(mask_bt, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(ids_bt, dtype=torch.long),
                       attention_mask=torch.tensor(mask_bt, dtype=torch.long),
                       position_ids=torch.tensor(positions_bt, dtype=torch.long))
    return out.logits.float().numpy()


def test_the_checkpoint_is_read_as_its_family(pair):
    hf_model, model, family = pair
    config = model.config
    assert config.architecture == type(hf_model).__name__
    assert (config.num_heads, config.num_kv_heads) == (4, 2)  # GQA
    expected = {
        "llama3-rope-untied": lambda: config.rope_type == "llama3" and model.lm_head is not None,
        "llama-tied": lambda: config.tie_word_embeddings and model.lm_head is None and config.rope_theta == 500000.0,
        "mistral-sliding-window": lambda: config.windows == (4, 4),
        "qwen2-qkv-bias": lambda: config.qkv_bias and model.layers.self_attn.q_proj.bias is not None,
        "qwen3-qk-norm": lambda: config.qk_norm and config.head_dim == 24,
    }[family]
    assert expected(), config


def test_logits_match_transformers_on_a_padded_batch(pair):
    hf_model, model, _ = pair
    ids_bt, mask_bt = padded_batch()
    ours_btv = np.asarray(model(ids_bt, attention_mask_bt=mask_bt).logits_btv)
    theirs_btv = hf_logits(hf_model, ids_bt, mask_bt)
    assert ours_btv.dtype == np.float32
    assert np.abs(theirs_btv[mask_bt]).max() > 1.0, "random weights should give logits far from uniform"
    np.testing.assert_array_less(np.abs(ours_btv - theirs_btv)[mask_bt].max(), 1e-4)


@pytest.mark.parametrize("pair", ["mistral-sliding-window"], indirect=True)
def test_sliding_window_changes_the_logits_it_is_compared_on(pair):
    """The Mistral parity above is only meaningful if the window cuts attention on this sequence."""
    _, model, _ = pair
    graphdef, _ = nnx.split(abstract_model(model.config.replace(sliding_windows=())))
    full_attention = nnx.merge(graphdef, nnx.state(model))
    ids_bt, mask_bt = padded_batch()
    windowed = np.asarray(model(ids_bt, attention_mask_bt=mask_bt).logits_btv)
    unwindowed = np.asarray(full_attention(ids_bt, attention_mask_bt=mask_bt).logits_btv)
    assert np.abs(windowed - unwindowed)[mask_bt].max() > 1e-2


def test_greedy_16_tokens_match_transformers_generate_on_a_padded_batch(pair):
    hf_model, model, _ = pair
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (3, 9, 6)]
    ids_bt, mask_bt = left_pad(prompts, 0)
    ours_bn = generate_ids(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False),
                           eos_ids=(), pad_id=0)
    with torch.no_grad():
        hf_out = hf_model.generate(input_ids=torch.tensor(ids_bt, dtype=torch.long),
                                   attention_mask=torch.tensor(mask_bt, dtype=torch.long),
                                   max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    theirs_bn = hf_out[:, ids_bt.shape[1]:].numpy()
    assert theirs_bn.shape == (len(prompts), NEW_TOKENS)
    np.testing.assert_array_equal(ours_bn, theirs_bn)
    assert len(set(ours_bn.ravel().tolist())) > 6, "continuations should not collapse to a few tokens"
