"""GGUF reading and GGUF -> Hugging Face conversion, on tiny GGUF files written by the tests."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from safetensors import safe_open

from jaxmoelora.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError
from jaxmoelora.loading.gguf import (
    GGUFCheckpoint,
    convert_gguf_to_hf,
    llama3_rope_divisors,
    unpermute_qk_rows,
)

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, CONTEXT = 64, 96, 4, 2, 2, 128
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["the", "hello", "world", "in", "and", "capital", "France"]
TEXTS = [
    "hello world",
    "The capital of France is Paris.",
    "  two  spaces\n\nnewlines\tand tabs 12345",
    "<|im_start|>user\nhello<|im_end|>",
    "Ünïcödé 日本 🙂",
]


# ----- writing tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py does -----------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """Special tokens, the 256 byte characters, and merges spelling a few words (with and without a leading space)."""
    tokens = [*SPECIAL_TOKENS, *_bytes_to_unicode().values()]
    merges: list[str] = []
    for spelled in [*("Ġ" + word for word in WORDS), *WORDS]:
        pieces = list(spelled)
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, types, merges


VOCAB = len(byte_level_vocab()[0])


def add_byte_level_tokenizer(writer: gguf.GGUFWriter) -> None:
    """SmolLM2-style metadata: gpt2 byte-level BPE, ChatML control tokens, bos/eos/pad/unk and a chat template."""
    tokens, types, merges = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


SENTENCEPIECE_PIECES = [
    *["▁", "e", "h", "l", "o", "w", "r", "d", "t"],
    *["▁h", "▁w", "he", "ll", "llo", "▁he", "▁hello", "or", "ld"],
]
SENTENCEPIECE_TOKENS = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SENTENCEPIECE_PIECES]


def add_sentencepiece_tokenizer(writer: gguf.GGUFWriter) -> None:
    """Llama-2-style metadata: sentencepiece pieces with scores and byte tokens, and no merges."""
    pieces = SENTENCEPIECE_PIECES
    writer.add_tokenizer_model("llama")
    writer.add_token_list(SENTENCEPIECE_TOKENS)
    writer.add_token_types([2, 3, 3, *[6] * 256, *[1] * len(pieces)])
    writer.add_token_scores([0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_weights(
    arch: str = "llama",
    tied: bool = True,
    hidden: int = HIDDEN,
    ffn: int = FFN,
    head_dim: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random HF-layout weights for a tiny model."""
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // HEADS

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(VOCAB, hidden), "model.norm.weight": 1 + 0.1 * w(hidden)}
    if not tied:
        weights["lm_head.weight"] = w(VOCAB, hidden)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": w(HEADS * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(KV_HEADS * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(KV_HEADS * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, HEADS * head_dim),
            p + "mlp.gate_proj.weight": w(ffn, hidden),
            p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
            p + "input_layernorm.weight": 1 + 0.1 * w(hidden),
            p + "post_attention_layernorm.weight": 1 + 0.1 * w(hidden),
        }
        if arch == "qwen2":
            for proj, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                weights[p + f"self_attn.{proj}_proj.bias"] = w(rows * head_dim)
        if arch == "qwen3":
            weights[p + "self_attn.q_norm.weight"] = 1 + 0.1 * w(head_dim)
            weights[p + "self_attn.k_norm.weight"] = 1 + 0.1 * w(head_dim)
    return weights


def gguf_name(hf_name: str) -> str:
    names = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    stem, _, kind = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, module = stem.split(".", 3)
        return f"blk.{layer}.{names[module]}.{kind}"
    return f"{names[stem]}.{kind}"


def to_gguf_layout(hf_name: str, weight: np.ndarray, arch: str) -> np.ndarray:
    """What llama.cpp stores: Q/K rows (weights and biases) permuted for llama only."""
    if arch == "llama" and ".q_proj." in hf_name:
        return permute(weight, HEADS)
    if arch == "llama" and ".k_proj." in hf_name:
        return permute(weight, KV_HEADS)
    return weight


def write_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    arch: str = "llama",
    qtype: QType = QType.F32,
    add_tokenizer: Callable[[gguf.GGUFWriter], None] | None = add_byte_level_tokenizer,
    hidden: int = HIDDEN,
    ffn: int = FFN,
    head_dim: int | None = None,
    raw: dict[str, tuple[np.ndarray, QType]] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """A GGUF file holding `weights` (matrices in `qtype`, vectors in F32) or `raw` pre-encoded tensors."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    if head_dim is not None:
        writer.add_key_length(head_dim)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    if add_tokenizer is not None:
        add_tokenizer(writer)
    for hf_name, weight in weights.items():
        data = to_gguf_layout(hf_name, weight, arch)
        if data.ndim == 1 or qtype == QType.F32:
            writer.add_tensor(gguf_name(hf_name), data)
        else:
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, (data, tensor_type) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_llama(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    weights = tiny_weights()
    return write_gguf(tmp_path / "tiny-llama.gguf", weights), weights


# ----- config ---------------------------------------------------------------------------------------------------------


def test_hf_config_describes_the_model(tiny_llama: tuple[Path, dict[str, np.ndarray]]) -> None:
    config = GGUFCheckpoint(tiny_llama[0]).hf_config()
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (HEADS, KV_HEADS, 16)
    assert config["rms_norm_eps"] == 1e-5  # not float32's 9.99999974e-06
    assert config["rope_theta"] == 50000.0
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert (config["max_position_embeddings"], config["vocab_size"]) == (CONTEXT, VOCAB)
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["attention_bias"] is False


def test_untied_head_is_read_and_config_says_so(tmp_path: Path) -> None:
    weights = tiny_weights(tied=False)
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "untied.gguf", weights))
    assert checkpoint.hf_config()["tie_word_embeddings"] is False
    np.testing.assert_array_equal(checkpoint.get_tensor("lm_head.weight"), weights["lm_head.weight"])


def test_tied_model_has_no_lm_head(tiny_llama: tuple[Path, dict[str, np.ndarray]]) -> None:
    names = GGUFCheckpoint(tiny_llama[0]).tensor_names()
    assert "lm_head.weight" not in names
    assert sorted(names) == sorted(tiny_llama[1])
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"


def test_linear_and_yarn_rope_scaling_come_from_metadata(tmp_path: Path) -> None:
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    path = write_gguf(tmp_path / "linear.gguf", tiny_weights(), extra_metadata=linear)
    rope = GGUFCheckpoint(path).hf_config()["rope_parameters"]
    assert rope == {"rope_type": "linear", "rope_theta": 50000.0, "factor": 2.0}

    yarn = {
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 32,
    }
    path = write_gguf(tmp_path / "yarn.gguf", tiny_weights(), extra_metadata=yarn)
    rope = GGUFCheckpoint(path).hf_config()["rope_parameters"]
    assert rope == {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 32}


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path: Path) -> None:
    head_dim = HIDDEN // HEADS
    divisors = llama3_rope_divisors(50000.0, head_dim, 8.0, 1.0, 4.0, 64).astype(np.float32)
    assert divisors.min() == 1.0 and divisors.max() == 8.0 and ((divisors > 1) & (divisors < 8)).any()
    raw = {"rope_freqs.weight": (divisors, QType.F32)}
    metadata = {"llama.rope.scaling.original_context_length": 64}
    path = write_gguf(tmp_path / "llama3.gguf", tiny_weights(), raw=raw, extra_metadata=metadata)
    checkpoint = GGUFCheckpoint(path)
    assert "rope_freqs.weight" not in checkpoint.tensor_names()
    assert checkpoint.hf_config()["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 50000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }

    odd = {"rope_freqs.weight": (np.linspace(1, 3, head_dim // 2, dtype=np.float32), QType.F32)}
    path = write_gguf(tmp_path / "odd-rope.gguf", tiny_weights(), raw=odd, extra_metadata=metadata)
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        GGUFCheckpoint(path).hf_config()


# ----- weights --------------------------------------------------------------------------------------------------------


def test_f32_weights_round_trip_exactly_with_qk_permutation_undone(
    tiny_llama: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, weights = tiny_llama
    checkpoint = GGUFCheckpoint(path)
    raw_q = next(t.data for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    assert not np.array_equal(raw_q, weights["model.layers.0.self_attn.q_proj.weight"])  # the file holds it permuted
    for name, weight in weights.items():
        loaded = checkpoint.get_tensor(name)
        assert loaded.dtype == np.float32 and loaded.flags.writeable
        np.testing.assert_array_equal(loaded, weight, err_msg=name)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_qk_rows(permute(w, heads), heads), w)
    bias = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk_rows(permute(bias, 3), 3), bias)


# Relative error (Frobenius) each quantization may add to N(0, 0.25) weights.
QUANT_TOLERANCE = {
    QType.F16: 1e-3,
    QType.BF16: 5e-3,
    QType.Q8_0: 1e-2,
    QType.Q5_0: 6e-2,
    QType.Q5_1: 6e-2,
    QType.Q4_0: 0.12,
    QType.Q4_1: 0.12,
}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_weights_dequantize_close_to_the_originals(tmp_path: Path, qtype: QType) -> None:
    weights = tiny_weights()
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / f"{qtype.name}.gguf", weights, qtype=qtype))
    for name, weight in weights.items():
        loaded = checkpoint.get_tensor(name)
        assert loaded.shape == weight.shape and loaded.dtype == np.float32
        if weight.ndim == 2:  # exactly what gguf's own round trip gives, un-permuted
            stored = to_gguf_layout(name, weight, "llama")
            expected = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
            np.testing.assert_array_equal(permute_back(name, expected), loaded, err_msg=name)
        error = np.linalg.norm(loaded - weight) / np.linalg.norm(weight)
        assert error < QUANT_TOLERANCE[qtype] if weight.ndim == 2 else error == 0, (name, error)


def permute_back(hf_name: str, stored: np.ndarray) -> np.ndarray:
    if ".q_proj." in hf_name:
        return unpermute_qk_rows(stored, HEADS)
    if ".k_proj." in hf_name:
        return unpermute_qk_rows(stored, KV_HEADS)
    return stored


def reference_q4_dequantize(blocks: np.ndarray, qtype: QType) -> np.ndarray:
    """ggml's Q4_0 / Q4_1 block decoding, written out: fp16 scale (and min), then 32 nibbles, low halves first."""
    values = []
    for block in blocks.reshape(-1, 18 if qtype == QType.Q4_0 else 20):
        scale = float(block[:2].view(np.float16)[0])
        low = float(block[2:4].view(np.float16)[0]) if qtype == QType.Q4_1 else 0.0
        packed = block[2:] if qtype == QType.Q4_0 else block[4:]
        nibbles = np.concatenate([packed & 0x0F, packed >> 4]).astype(np.float32)
        values.append((nibbles - 8) * scale if qtype == QType.Q4_0 else nibbles * scale + low)
    return np.concatenate(values)


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1], ids=lambda q: q.name)
def test_q4_blocks_decode_as_ggml_specifies(tmp_path: Path, qtype: QType) -> None:
    weights = tiny_weights()
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / f"{qtype.name}.gguf", weights, qtype=qtype))
    name = "model.layers.1.mlp.down_proj.weight"
    blocks = gguf.quants.quantize(weights[name], qtype)
    expected = reference_q4_dequantize(blocks, qtype).reshape(weights[name].shape)
    np.testing.assert_allclose(checkpoint.get_tensor(name), expected, rtol=0, atol=1e-6)


K_QUANTS = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quant_tensors_dequantize_like_gguf(tmp_path: Path, qtype: QType) -> None:
    """gguf-py cannot quantize K-quants, so the file holds random blocks; we must decode them as gguf does."""
    hidden = ffn = 256  # K-quant blocks span 256 values
    weights = tiny_weights(hidden=hidden, ffn=ffn)
    rng = np.random.default_rng(1)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw: dict[str, tuple[np.ndarray, QType]] = {}
    for name, weight in list(weights.items()):
        if weight.ndim == 2:
            blocks = rng.integers(0, 256, (weight.shape[0], weight.shape[1] // block_size * type_size), np.uint8)
            blocks &= 0xBF  # bit 6 of a byte is the top exponent bit of any fp16 scale in it: keeps scales finite
            raw[gguf_name(name)] = (blocks, qtype)
            del weights[name]
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", weights, hidden=hidden, ffn=ffn, raw=raw)
    checkpoint = GGUFCheckpoint(path)
    for gguf_tensor_name, (blocks, _) in raw.items():
        hf_name = next(n for n in checkpoint.tensor_names() if gguf_name(n) == gguf_tensor_name)
        expected = permute_back(hf_name, gguf.quants.dequantize(blocks, qtype))
        np.testing.assert_array_equal(checkpoint.get_tensor(hf_name), expected, err_msg=hf_name)


def test_qwen2_keeps_qk_rows_and_reads_biases(tmp_path: Path) -> None:
    weights = tiny_weights("qwen2")
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "qwen2.gguf", weights, arch="qwen2"))
    config = checkpoint.hf_config()
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["attention_bias"] is True
    for name, weight in weights.items():
        np.testing.assert_array_equal(checkpoint.get_tensor(name), weight, err_msg=name)


def test_qwen3_reads_qk_norms_and_head_dim(tmp_path: Path) -> None:
    weights = tiny_weights("qwen3", head_dim=32)  # head_dim != hidden / heads, as in Qwen3
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "qwen3.gguf", weights, arch="qwen3", head_dim=32))
    config = checkpoint.hf_config()
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32
    for name, weight in weights.items():
        np.testing.assert_array_equal(checkpoint.get_tensor(name), weight, err_msg=name)


# ----- errors ---------------------------------------------------------------------------------------------------------


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path: Path) -> None:
    raw = {"blk.0.ffn_up.weight": (np.zeros((FFN, HIDDEN), np.int32), QType.I32)}
    weights = {k: v for k, v in tiny_weights().items() if k != "model.layers.0.mlp.up_proj.weight"}
    path = write_gguf(tmp_path / "int.gguf", weights, raw=raw)
    checkpoint = GGUFCheckpoint(path)
    with pytest.raises(CheckpointError, match=r"int\.gguf.*blk\.0\.ffn_up\.weight.*I32.*Supported types:.*Q4_K"):
        checkpoint.get_tensor("model.layers.0.mlp.up_proj.weight")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="I32"):
        convert_gguf_to_hf(path, out)
    assert not out.exists() and list(tmp_path.glob(".out.partial-*")) == []


def test_unknown_tensor_type_code_is_a_checkpoint_error(tiny_llama: tuple[Path, dict[str, np.ndarray]]) -> None:
    path = tiny_llama[0]
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = (250).to_bytes(4, "little")  # no such ggml type
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tiny-llama\.gguf.*supported tensor types"):
        GGUFCheckpoint(path)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_weights(), arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match=r"gpt2\.gguf.*'gpt2'.*llama, qwen2, qwen3"):
        GGUFCheckpoint(path)


def test_missing_and_invalid_files_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not found.*nothing\.gguf"):
        GGUFCheckpoint(tmp_path / "nothing.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=r"garbage\.gguf"):
        GGUFCheckpoint(garbage)


def test_missing_tokenizer_is_a_tokenizer_error(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "no-tokenizer.gguf", tiny_weights(), add_tokenizer=None)
    with pytest.raises(TokenizerError, match=r"no-tokenizer\.gguf has no tokenizer"):
        GGUFCheckpoint(path).tokenizer()
    with pytest.raises(TokenizerError):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_merges_is_a_tokenizer_error(tmp_path: Path) -> None:
    def vocabulary_without_merges(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(byte_level_vocab()[0])

    path = write_gguf(tmp_path / "no-merges.gguf", tiny_weights(), add_tokenizer=vocabulary_without_merges)
    with pytest.raises(TokenizerError, match=r"no-merges\.gguf.*no merges"):
        GGUFCheckpoint(path).tokenizer()


def test_existing_output_dir_is_not_overwritten(tiny_llama: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_gguf_to_hf(tiny_llama[0], out)
    assert (out / "keep.txt").read_text() == "mine"


# ----- tokenizer ------------------------------------------------------------------------------------------------------


def test_byte_level_tokenizer_encodes_and_decodes(tiny_llama: tuple[Path, dict[str, np.ndarray]]) -> None:
    checkpoint = GGUFCheckpoint(tiny_llama[0])
    tokenizer = checkpoint.tokenizer()
    tokens = byte_level_vocab()[0]
    assert tokenizer.encode("hello world").ids == [tokens.index("hello"), tokens.index("Ġworld")]
    assert tokenizer.encode("<|im_start|>the").ids == [1, tokens.index("the")]  # control tokens stay whole
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert checkpoint.chat_template == CHAT_TEMPLATE
    assert (checkpoint.special_tokens.bos, checkpoint.special_tokens.eos) == (1, 2)
    assert (checkpoint.special_tokens.pad, checkpoint.special_tokens.unk) == (2, 0)


@pytest.mark.torch
def test_byte_level_tokenizer_matches_transformers_gguf_loader(
    tiny_llama: tuple[Path, dict[str, np.ndarray]],
) -> None:
    pytest.importorskip("torch", reason="transformers reads GGUF files only with torch installed")
    from transformers import AutoTokenizer

    path = tiny_llama[0]
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = GGUFCheckpoint(path).tokenizer()
    for text in TEXTS:
        assert ours.encode(text).ids == reference(text)["input_ids"], text


def write_sentencepiece_gguf(path: Path) -> Path:
    return write_gguf(path, tiny_weights(), add_tokenizer=add_sentencepiece_tokenizer)


def test_sentencepiece_tokenizer_merges_by_score_and_falls_back_to_bytes(tmp_path: Path) -> None:
    tokenizer = GGUFCheckpoint(write_sentencepiece_gguf(tmp_path / "sp.gguf")).tokenizer()
    assert tokenizer.encode("hello world").tokens == ["<s>", "▁hello", "▁w", "or", "ld"]
    assert tokenizer.encode("ü").tokens == ["<s>", "▁", "<0xC3>", "<0xBC>"]
    assert tokenizer.decode(tokenizer.encode("hello ü world").ids, skip_special_tokens=True) == "hello ü world"


def test_converted_sentencepiece_tokenizer_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_sentencepiece_gguf(tmp_path / "sp.gguf")
    ours = GGUFCheckpoint(path).tokenizer()
    theirs = AutoTokenizer.from_pretrained(convert_gguf_to_hf(path, tmp_path / "hf"))
    assert (theirs.bos_token, theirs.eos_token, theirs.unk_token) == ("<s>", "</s>", "<unk>")
    for text in ["hello world", "hello  hello", "ü x", "held\nworld"]:
        assert theirs(text)["input_ids"] == ours.encode(text).ids, text
        assert theirs.decode(ours.encode(text).ids, skip_special_tokens=True) == text


@pytest.mark.torch
def test_sentencepiece_tokenizer_matches_transformers_gguf_loader(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="transformers reads GGUF files only with torch installed")
    from transformers import AutoTokenizer

    path = write_sentencepiece_gguf(tmp_path / "sp.gguf")
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = GGUFCheckpoint(path).tokenizer()
    for text in ["hello world", "hello  hello", "ü x", "held\nworld"]:
        ids = ours.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert ids[0] == 1  # llama.cpp adds bos for sentencepiece vocabularies
        assert ours.decode(ids, skip_special_tokens=True) == text


# ----- conversion -----------------------------------------------------------------------------------------------------


def test_converted_directory_loads_in_transformers(
    tiny_llama: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    path, weights = tiny_llama
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.hidden_size, config.num_key_value_heads) == ("llama", HIDDEN, KV_HEADS)
    assert config.rope_parameters["rope_theta"] == 50000.0 and config.tie_word_embeddings

    with safe_open(str(out / "model.safetensors"), "np") as file:
        assert file.metadata() == {"format": "pt"}
        assert sorted(file.keys()) == sorted(weights)
        for name, weight in weights.items():
            np.testing.assert_array_equal(file.get_tensor(name), weight, err_msg=name)

    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = GGUFCheckpoint(path).tokenizer()
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == ours.encode(text).ids, text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_converted_model_logits_match_transformers_built_from_the_originals(tmp_path: Path, arch: str) -> None:
    torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed")
    import transformers

    head_dim = 32 if arch == "qwen3" else None
    weights = tiny_weights(arch, tied=arch != "qwen2", head_dim=head_dim)
    path = write_gguf(tmp_path / f"{arch}.gguf", weights, arch=arch, head_dim=head_dim)
    model = transformers.AutoModelForCausalLM.from_pretrained(convert_gguf_to_hf(path, tmp_path / "hf"))

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    reference = model_class(
        config_class(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            head_dim=head_dim or HIDDEN // HEADS,
            max_position_embeddings=CONTEXT,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            tie_word_embeddings=arch != "qwen2",
        )
    )
    missing, unexpected = reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    input_ids = torch.tensor([[5, 17, 42, 3, 99, 250, 7, 1]])
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = model(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not math.isnan(float(actual.abs().max()))
