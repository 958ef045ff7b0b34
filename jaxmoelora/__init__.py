"""jaxmoelora: mixture-of-LoRA-experts fine-tuning for Llama-family models in JAX/Flax NNX."""

from jaxmoelora.adapters.apply import apply_adapters, merge_lora, merge_model, split_model, unmerge_lora
from jaxmoelora.adapters.config import PRESETS, AdapterConfig, preset
from jaxmoelora.loading.pretrained import from_pretrained, load_config, load_tokenizer
from jaxmoelora.models.config import ModelConfig
from jaxmoelora.models.decoder import CausalLM, KVCache, init_model

__all__ = [
    "AdapterConfig", "CausalLM", "KVCache", "ModelConfig", "PRESETS", "apply_adapters", "from_pretrained",
    "init_model", "load_config", "load_tokenizer", "merge_lora", "merge_model", "preset", "split_model",
    "unmerge_lora",
]
