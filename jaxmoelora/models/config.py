"""The decoder configuration, read from a Hugging Face `config.json` through `transformers.AutoConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxmoelora.errors import ConfigError, UnsupportedArchitectureError

# Hugging Face architecture name -> what differs from plain Llama.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


# What a rematerialised (remat=True) layer keeps for the backward pass, as jax.checkpoint policies: "full" keeps only
# the layer's input and recomputes everything; "save_dots" keeps the outputs of matmuls without batch dimensions (the
# projections) and recomputes attention and elementwise ops (MaxText's and levanter's middle setting).
REMAT_POLICIES = {"full": "nothing_saveable", "save_dots": "dots_with_no_batch_dims_saveable"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, TinyLlama, SmolLM2, Mistral, Qwen2, Qwen3)."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()  # extra RoPE parameters (factor, low_freq_factor, ...)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # q/k/v/o biases (Llama `attention_bias`)
    qkv_bias: bool = False  # q/k/v biases only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    # Per-layer sliding window (tokens a query may look back, itself included); 0 means full attention.
    sliding_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Numerics and memory.
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of the frozen weights
    scan_layers: bool = True  # lax.scan over the stacked layers: compile time independent of depth
    remat: bool = False  # recompute each decoder layer in the backward pass
    remat_policy: str = "full"  # with remat, what is kept: see REMAT_POLICIES

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not a known dtype; use one of {sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r} is unknown; use one of {sorted(REMAT_POLICIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"RoPE type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ConfigError(f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def windows(self) -> tuple[int, ...]:
        return self.sliding_windows or (0,) * self.num_layers

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "ModelConfig":
        """Builds the config from a `transformers.PretrainedConfig` (as `AutoConfig.from_pretrained` returns)."""
        architectures = list(getattr(hf_config, "architectures", None) or [])
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise UnsupportedArchitectureError(
                f"architecture {architectures or getattr(hf_config, 'model_type', '?')} is not supported; "
                f"jaxmoelora implements {sorted(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[architecture]
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        legacy_scaling = getattr(hf_config, "rope_scaling", None)
        if isinstance(legacy_scaling, dict):
            rope = {**legacy_scaling, **rope}
        rope_theta = rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("partial_rotary_factor", None)
        num_layers = hf_config.num_hidden_layers
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        values = dict(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope_theta),
            rope_type=rope_type,
            rope_scaling=tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, (int, float)))),
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            attention_bias=bool(getattr(hf_config, "attention_bias", False)) and not family.get("qkv_bias"),
            qkv_bias=family.get("qkv_bias", False),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=family.get("qk_norm", False),
            sliding_windows=_sliding_windows(hf_config, architecture, num_layers),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=eos_ids,
            pad_token_id=getattr(hf_config, "pad_token_id", None),
        )
        values.update(overrides)
        return cls(**values)


def _sliding_windows(hf_config: Any, architecture: str, num_layers: int) -> tuple[int, ...]:
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return ()
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
    if architecture == "MistralForCausalLM":
        return (int(window),) * num_layers
    if getattr(hf_config, "use_sliding_window", False):
        first_full = getattr(hf_config, "max_window_layers", num_layers)
        return tuple(int(window) if i >= first_full else 0 for i in range(num_layers))
    return ()
