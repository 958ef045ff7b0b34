"""A tiny random Llama checkpoint in Hugging Face layout, written without torch (a unique module name, imported
by conftest.py and the test helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def write_tiny_llama(directory: Path, seed: int = 0, scale: float = 0.1, **config_overrides) -> Path:
    """config.json and model.safetensors of a random LlamaForCausalLM (weights ~ N(0, scale), norms ~ N(1, scale)),
    named and shaped as transformers saves them: (out, in) matrices."""
    import transformers
    from safetensors.numpy import save_file

    c = transformers.LlamaConfig(**{**TINY_LLAMA, **config_overrides}, architectures=["LlamaForCausalLM"])
    c.save_pretrained(directory)
    d, f, v, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(c.num_hidden_layers):
        layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                 "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
                 "input_layernorm": (d,), "post_attention_layernorm": (d,)}
        shapes |= {f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()}
    rng = np.random.default_rng(seed)
    tensors = {name: ((1.0 if name.endswith("norm.weight") else 0.0)
                      + scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    save_file(tensors, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
    return Path(directory)
