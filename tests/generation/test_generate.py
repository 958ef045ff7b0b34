"""Batched generation: equal to a naive uncached loop, batch independent, stops at EOS, compiled once per bucket."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoelora.errors import TokenizerError
from jaxmoelora.generation import (
    GenerationConfig, clear_compiled_cache, generate, generate_detailed, generate_ids, generate_ids_detailed, left_pad,
    trace_count)
from jaxmoelora.models.config import ModelConfig
from jaxmoelora.models.decoder import init_model

TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, max_position_embeddings=256, eos_token_ids=(), pad_token_id=0)
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [60, 61, 2, 3, 4, 70, 71, 72, 73, 74, 75, 76, 77, 78]]
MAX_NEW = 12
PAD = 0


@pytest.fixture(scope="module")
def model():
    return init_model(TINY, seed=0)


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, ids_bt):
    return nnx.merge(graphdef, state)(ids_bt).logits_btv


def reference_greedy(model, prompt: list[int], max_new: int, eos_ids=()) -> list[int]:
    """Re-runs the whole model without a cache on the growing sequence and appends the argmax, one token at a time.

    The sequence sits right-padded in a fixed buffer: causal attention makes the padding invisible to earlier tokens,
    and one buffer shape means one compilation."""
    buffer_len = 64
    graphdef, state = nnx.split(model)
    sequence = list(prompt)
    new = []
    for _ in range(max_new):
        ids_bt = np.zeros((1, buffer_len), np.int32)
        ids_bt[0, :len(sequence)] = sequence
        token = int(np.argmax(np.asarray(_full_forward(graphdef, state, ids_bt))[0, len(sequence) - 1]))
        new.append(token)
        sequence.append(token)
        if token in eos_ids:
            break
    return new


@pytest.fixture(scope="module")
def reference(model):
    return [reference_greedy(model, p, MAX_NEW) for p in PROMPTS]


def padded_to(tokens, n, pad=PAD):
    return list(tokens) + [pad] * (n - len(tokens))


def test_greedy_left_padded_batch_equals_the_uncached_reference_loop(model, reference):
    ids_bt, mask_bt = left_pad(PROMPTS, PAD)
    tokens_bn = generate_ids(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=MAX_NEW), eos_ids=(), pad_id=PAD)
    assert tokens_bn.shape == (len(PROMPTS), MAX_NEW)
    np.testing.assert_array_equal(tokens_bn, np.asarray(reference))
    assert len({tuple(r) for r in reference}) == len(PROMPTS), "the prompts should lead to different continuations"


def test_each_row_equals_its_prompt_generated_alone(model):
    ids_bt, mask_bt = left_pad(PROMPTS, PAD)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    batch_bn = generate_ids(model, ids_bt, mask_bt, config, eos_ids=(), pad_id=PAD)
    for row, prompt in enumerate(PROMPTS):
        alone_bt, alone_mask_bt = left_pad([prompt], PAD)
        alone_bn = generate_ids(model, alone_bt, alone_mask_bt, config, eos_ids=(), pad_id=PAD)
        np.testing.assert_array_equal(batch_bn[row], alone_bn[0])


def first_new_token_at_or_after(tokens: list[int], index: int) -> tuple[int, int]:
    """A token of `tokens` that first occurs at position >= index (so greedy decoding reaches it only there)."""
    for i in range(index, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return tokens[i], i
    pytest.skip("the reference continuation repeats itself; no fresh token to use as EOS")


def test_rows_stop_at_eos_and_are_padded_after_it(model, reference):
    eos, stop = first_new_token_at_or_after(reference[0], 3)
    ids_bt, mask_bt = left_pad(PROMPTS, PAD)
    result = generate_ids_detailed(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=MAX_NEW),
                                   eos_ids=(eos,), pad_id=PAD)
    for row in range(len(PROMPTS)):
        expected = reference_greedy(model, PROMPTS[row], MAX_NEW, eos_ids=(eos,))
        np.testing.assert_array_equal(result.tokens_bn[row], padded_to(expected, MAX_NEW))
        assert result.num_tokens_b[row] == len(expected)
        assert result.finish_reasons[row] == ("eos" if expected[-1] == eos else "length")
    assert result.finish_reasons[0] == "eos" and result.num_tokens_b[0] == stop + 1


def test_loop_ends_when_every_row_has_finished(model, reference):
    eos, stop = first_new_token_at_or_after(reference[0], 2)
    ids_bt, mask_bt = left_pad(PROMPTS[:1], PAD)
    result = generate_ids_detailed(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=MAX_NEW),
                                   eos_ids=(eos,), pad_id=PAD)
    assert result.decode_steps == stop + 1 < MAX_NEW
    no_stop = generate_ids_detailed(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=MAX_NEW, stop_at_eos=False),
                                    eos_ids=(eos,), pad_id=PAD)
    np.testing.assert_array_equal(no_stop.tokens_bn[0], reference[0])
    assert no_stop.finish_reasons == ("length",) and no_stop.decode_steps == MAX_NEW


def test_a_model_whose_head_favours_eos_stops_after_one_token():
    eos, prompt = 7, [5, 6]
    model = init_model(TINY, seed=1)
    # Only the eos logit is non-zero: hidden[0] * sign(hidden[0]) > 0 at the last prompt token.
    hidden_sign = np.sign(np.asarray(model(jnp.asarray([prompt])).hidden_btd)[0, -1, 0])
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...]).at[0, eos].set(hidden_sign)
    ids_bt, mask_bt = left_pad([prompt], PAD)
    result = generate_ids_detailed(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=8), eos_ids=(eos,), pad_id=3)
    np.testing.assert_array_equal(result.tokens_bn, [[eos, 3, 3, 3, 3, 3, 3, 3]])
    assert result.finish_reasons == ("eos",) and result.decode_steps == 1 and result.num_tokens_b.tolist() == [1]


def test_second_call_in_the_same_bucket_does_not_retrace(model):
    clear_compiled_cache()
    ids_bt, mask_bt = left_pad(PROMPTS, PAD)  # 3 rows of up to 14 tokens: bucket (4, 16)
    generate_ids(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=MAX_NEW), eos_ids=(), pad_id=PAD)
    traces = trace_count()
    # Same bucket: a different batch size, prompt length, max_new_tokens, EOS ids and (greedy) seed.
    ids_bt, mask_bt = left_pad(PROMPTS[:2] + PROMPTS[:2], PAD)
    result = generate_ids_detailed(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=9, seed=5),
                                   eos_ids=(1,), pad_id=PAD)
    assert trace_count() == traces and result.compile_s == 0.0
    # Another sampling mode or bucket compiles once, then is reused with any temperature and top_p.
    for temperature, top_p in [(0.7, 0.9), (1.3, 0.5)]:
        generate_ids(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=9, temperature=temperature, top_p=top_p),
                     eos_ids=(), pad_id=PAD)
    assert trace_count() == traces + 1
    # A model with the same structure but other weights shares the executable.
    generate_ids(init_model(TINY, seed=3), ids_bt, mask_bt, GenerationConfig(max_new_tokens=9), eos_ids=(), pad_id=PAD)
    assert trace_count() == traces + 1


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(model):
    ids_bt, mask_bt = left_pad(PROMPTS, PAD)

    def run(seed):
        config = GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95, seed=seed)
        return generate_ids(model, ids_bt, mask_bt, config, eos_ids=(), pad_id=PAD)

    np.testing.assert_array_equal(run(0), run(0))
    assert (run(0) != run(1)).any()


def test_generate_config_rejects_invalid_values():
    from jaxmoelora.errors import ConfigError
    for bad in [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ConfigError):
            GenerationConfig(**bad)


def test_right_padded_input_is_rejected(model):
    with pytest.raises(ValueError, match="left padded"):
        generate_ids(model, np.asarray([[5, 6, 0]]), np.asarray([[1, 1, 0]]), GenerationConfig(max_new_tokens=2),
                     eos_ids=(), pad_id=PAD)


# ----------------------------------------------------------------------------------------------------------------------
# Text level: chat templates, padding and decoding through a tokenizer.

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":", "hello", "world", "the", "sea", "is", "blue"]


def tiny_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(WORDS)} | {f"w{i}": i for i in range(len(WORDS), TINY.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def _jinja2_available() -> bool:
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return False
    return True


needs_jinja2 = pytest.mark.skipif(not _jinja2_available(), reason="transformers needs jinja2 to render chat templates")


@needs_jinja2
def test_generate_applies_the_chat_template_and_pads_on_the_left(model):
    tokenizer = tiny_tokenizer(CHAT)
    prompts = ["hello world", [{"role": "user", "content": "the sea is blue"}]]
    config = GenerationConfig(max_new_tokens=6)
    result = generate_detailed(model, tokenizer, prompts, config)
    expected_ids = [[1, 4, 6, 7, 8, 2, 1, 5, 6], [1, 4, 6, 9, 10, 11, 12, 2, 1, 5, 6]]
    ids_bt, mask_bt = left_pad(expected_ids, PAD)
    tokens_bn = generate_ids(model, ids_bt, mask_bt, config, eos_ids=(2,), pad_id=PAD)
    for row in range(2):
        n = result.num_tokens_b[row]
        kept = tokens_bn[row, :n - 1] if result.finish_reasons[row] == "eos" else tokens_bn[row, :n]
        assert result.texts[row] == tokenizer.decode(kept.tolist(), skip_special_tokens=True)
    np.testing.assert_array_equal(result.tokens_bn, tokens_bn)
    assert list(result.prompt_tokens_b) == [9, 11]
    assert generate(model, tokenizer, prompts, config) == list(result.texts)


def test_generate_without_a_template_tokenizes_the_plain_prompt(model):
    config = GenerationConfig(max_new_tokens=5)
    with_template = tiny_tokenizer(CHAT)
    plain = tiny_tokenizer(None)
    ids_bt, mask_bt = left_pad([[7, 8]], PAD)
    expected = plain.decode(generate_ids(model, ids_bt, mask_bt, config, (2,), PAD)[0].tolist(),
                            skip_special_tokens=True)
    assert generate(model, plain, ["hello world"], config) == [expected]
    assert generate(model, with_template, ["hello world"], config, chat_template=False) == [expected]
    with pytest.raises(TokenizerError, match="chat template"):
        generate(model, plain, [[{"role": "user", "content": "hello"}]], config)
    with pytest.raises(TokenizerError, match="no chat template"):
        generate(model, plain, ["hello"], config, chat_template=True)


def test_a_chat_template_without_jinja2_is_a_clear_error(model, monkeypatch):
    tokenizer = tiny_tokenizer(CHAT)

    def apply_chat_template(*args, **kwargs):  # what transformers raises when jinja2 is not installed
        raise ImportError("apply_chat_template requires jinja2 to be installed. Please install it using "
                          "`pip install jinja2`.")

    monkeypatch.setattr(tokenizer, "apply_chat_template", apply_chat_template)
    with pytest.raises(TokenizerError, match="jinja2.*--no-chat-template"):
        generate(model, tokenizer, ["hello"], GenerationConfig(max_new_tokens=2))


# ----------------------------------------------------------------------------------------------------------------------
# Sharded model: same tokens on a 4-device (data 2 x tensor 2) CPU mesh.

def test_generation_under_a_mesh_matches_one_device(tmp_path):
    script = textwrap.dedent(f"""
        import numpy as np
        from jaxmoelora.generation import GenerationConfig, generate_ids, left_pad
        from jaxmoelora.models.config import ModelConfig
        from jaxmoelora.models.decoder import init_model
        from jaxmoelora.sharding.rules import make_mesh, shard_model
        config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)
        ids_bt, mask_bt = left_pad({PROMPTS!r}, 0)
        gen = GenerationConfig(max_new_tokens=8)
        single = generate_ids(init_model(config), ids_bt, mask_bt, gen, eos_ids=(), pad_id=0)
        sharded_model = shard_model(init_model(config), make_mesh({{"data": 2, "tensor": 2}}))
        kernel = sharded_model.layers.mlp.up_proj.kernel[...]
        assert len(kernel.sharding.device_set) == 4, kernel.sharding
        sharded = generate_ids(sharded_model, ids_bt, mask_bt, gen, eos_ids=(), pad_id=0)
        np.testing.assert_array_equal(single, sharded)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------------
# Parity with transformers' generate (PyTorch reference).

def test_greedy_matches_transformers_generate_on_a_padded_batch(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers
    from jaxmoelora.loading.pretrained import from_pretrained

    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompts = [[1, 50, 51, 52], [1, 9, 8, 7, 6, 5, 4, 3, 20, 21], [1, 100]]
    ids_bt, mask_bt = left_pad(prompts, 0)
    max_new = 16
    # Pick an EOS id that greedy decoding of the first prompt reaches mid-way, so stopping is compared too.
    free_run = generate_ids(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=max_new), eos_ids=(), pad_id=0)
    eos = next((t for i, t in enumerate(free_run[0].tolist()) if i >= 4 and t not in free_run[0, :i]), 2)
    ours = generate_ids(model, ids_bt, mask_bt, GenerationConfig(max_new_tokens=max_new), eos_ids=(eos,), pad_id=0)
    with torch.no_grad():
        hf_out = hf_model.generate(input_ids=torch.tensor(ids_bt, dtype=torch.long),
                                   attention_mask=torch.tensor(mask_bt, dtype=torch.long), max_new_tokens=max_new,
                                   do_sample=False, eos_token_id=eos, pad_token_id=0)
    hf_new = hf_out[:, ids_bt.shape[1]:].numpy()
    hf_new = np.pad(hf_new, ((0, 0), (0, max_new - hf_new.shape[1])), constant_values=0)
    np.testing.assert_array_equal(ours, hf_new)
    assert eos in ours[0]
