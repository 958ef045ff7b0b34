"""Plain LoRA adapters as a Hugging Face PEFT adapter directory (`adapter_model.safetensors` + `adapter_config.json`),
which `peft.PeftModel.from_pretrained(hf_model, out_dir)` loads onto the base model in PyTorch.

PEFT stores per layer and module `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r), torch's (out, in) layout of
our A (d_in, r) and B (r, d_out), and scales by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora) as we do.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxmoelora.adapters.config import AdapterConfig
from jaxmoelora.adapters.lora_linear import AdaptedLinear
from jaxmoelora.errors import UnsupportedExportError
from jaxmoelora.loading.pretrained import hf_tensor_name
from jaxmoelora.models.decoder import CausalLM

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def export_peft(model: CausalLM, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Writes the model's plain LoRA adapter to `out_dir` in PEFT's format and returns `out_dir`.

    Every process must call it when the adapters are sharded across processes (they are gathered); only process 0
    writes."""
    config = model.adapter_config
    check_exportable(config)
    modules = _adapted_linears(model)
    tensors = {name: value for path, m in modules for name, value in _peft_tensors(path, m).items()}
    target_modules = sorted({path[-1] for path, _ in modules})
    out = Path(out_dir)
    if jax.process_index() == 0:
        from safetensors.numpy import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        peft_config = adapter_config_json(config, target_modules, base_model_name_or_path)
        (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def adapter_config_json(config: AdapterConfig, target_modules: list[str],
                        base_model_name_or_path: str | None) -> dict:
    """PEFT's LoraConfig fields for `config`: the same r, alpha and scaling rule, so PEFT computes our scale."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "use_rslora": config.use_rslora,
        "lora_dropout": config.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def check_exportable(config: AdapterConfig | None) -> None:
    """Raises UnsupportedExportError unless `config` is a plain LoRA adapter that PEFT can express."""
    if config is None:
        raise UnsupportedExportError("the model has no adapter to export; load it with an adapter, e.g. "
                                     "from_pretrained(path, adapter='lora'), or restore it from a training checkpoint")
    if config.method != "lora" or config.num_experts > 1 or config.ffn_moe:
        raise UnsupportedExportError(
            f"the {config.method!r} adapter (num_experts={config.num_experts}) is a mixture of experts, which PEFT's "
            "LoRA format cannot express; only the 'lora' method (one expert, no router) exports to PEFT")
    if config.merge_drop_rate > 0 and config.merge_at_inference:
        raise UnsupportedExportError("adapter.merge_at_inference masks the LoRA factors at inference, which PEFT "
                                     "cannot do; train with merge_at_inference=false to export to PEFT")


def _adapted_linears(model: CausalLM) -> list[tuple[tuple[str, ...], AdaptedLinear]]:
    """(graph path such as ('layers', 'self_attn', 'q_proj'), module) of every adapted linear."""
    found = [(tuple(str(p) for p in path), m) for path, m in nnx.iter_graph(model) if isinstance(m, AdaptedLinear)]
    for _, m in found:
        if m.router is not None or m.experts.num_experts != 1:
            raise UnsupportedExportError(f"{m.name} has {m.experts.num_experts} routed experts; only the 'lora' "
                                         "method (one expert, no router) exports to PEFT")
    if not found:
        raise UnsupportedExportError("the model has no adapted linear layers to export")
    return found


def _peft_tensors(path: tuple[str, ...], m: AdaptedLinear) -> dict[str, np.ndarray]:
    """lora_A (r, d_in) and lora_B (d_out, r) of every layer, under PEFT's names."""
    a_ledr = _gathered(m.experts.lora_a[...])
    b_lerf = _gathered(m.experts.lora_b[...])
    name = lambda factor, layer: PEFT_PREFIX + hf_tensor_name((*path, factor, "weight"), layer)  # noqa: E731
    tensors = {}
    for layer in range(a_ledr.shape[0]):
        a_rd, b_fr = a_ledr[layer, 0].T, b_lerf[layer, 0].T
        tensors[name("lora_A", layer)] = np.ascontiguousarray(a_rd, dtype=np.float32)
        tensors[name("lora_B", layer)] = np.ascontiguousarray(b_fr, dtype=np.float32)
    return tensors


def _gathered(x: jax.Array) -> np.ndarray:
    """The whole array on this host, collected from the other processes when it is sharded across them."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
