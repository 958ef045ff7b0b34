"""Fixtures for training tests: a tiny random Llama with a byte-level tokenizer and ChatML template, and small
JSONL datasets, all made here (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_chat_model(directory: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """config.json + model.safetensors (random, HF layout) + a byte-level BPE tokenizer with a ChatML template."""
    import transformers
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=SPECIALS)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)

    c = transformers.LlamaConfig(vocab_size=288, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=hidden // 4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    c.save_pretrained(directory)
    d, f, v, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(layers):
        layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                 "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
                 "input_layernorm": (d,), "post_attention_layernorm": (d,)}
        shapes |= {f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()}
    rng = np.random.default_rng(seed)
    tensors = {name: ((1.0 if name.endswith("norm.weight") else 0.0)
                      + 0.2 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def write_arithmetic_jsonl(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Tiny sums with task types 0/1 alternating (LoRAMoE's two groups)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.integers(0, 10, 2)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b), "task_type": i % 2}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def arithmetic_jsonl(tmp_path_factory) -> Path:
    return write_arithmetic_jsonl(tmp_path_factory.mktemp("data") / "sums.jsonl")


def tiny_overrides(model_dir: Path, data: Path, output_dir: Path, method: str = "loramoe", steps: int = 6) -> list[str]:
    """Overrides for a fast run of `method` on the tiny model (rank 2, small batches, no progress bar)."""
    return [f"model.path={model_dir}", f"data.path={data}", f"output_dir={output_dir}", f"adapter.method={method}",
            "adapter.rank=2", f"train.steps={steps}", "train.learning_rate=0.01", "train.warmup_steps=0",
            "data.batch_size=4", "data.max_length=64", "checkpoint.save_every=3", "checkpoint.async_save=false",
            "log.progress=false", "log.tensorboard=false", "log.plots=false"]
