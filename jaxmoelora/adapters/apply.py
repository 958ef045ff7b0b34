"""Putting adapters on a model, splitting it into what trains and what is frozen, and merging plain LoRA."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoelora.adapters.config import ATTENTION_MODULES, FFN_MODULES, AdapterConfig, preset
from jaxmoelora.adapters.ffn_moe import MoEFeedForward
from jaxmoelora.adapters.lora_linear import AdaptedLinear
from jaxmoelora.adapters.variables import AdapterState
from jaxmoelora.errors import ConfigError
from jaxmoelora.models.decoder import CausalLM

LINEAR_PARENTS = {name: "self_attn" for name in ATTENTION_MODULES} | {name: "mlp" for name in FFN_MODULES}


def module_path(name: str, layer: int = 0) -> str:
    """The PEFT-style path of a decoder linear, e.g. model.layers.0.self_attn.q_proj."""
    return f"model.layers.{layer}.{LINEAR_PARENTS[name]}.{name}"


def matches(pattern: str, path: str) -> bool:
    """PEFT's rule: a plain name matches the last path component(s); anything else is a full regex match."""
    if re.fullmatch(r"[\w.]+", pattern):
        return path == pattern or path.endswith("." + pattern)
    return re.fullmatch(pattern, path) is not None


def targeted_linears(config: AdapterConfig, num_layers: int) -> list[str]:
    """Names of the decoder linears that `config.target_modules` selects (the same in every layer)."""
    selected = []
    for pattern in config.target_modules:
        hits = [name for name in LINEAR_PARENTS if matches(pattern, module_path(name))]
        if not hits:
            paths = [module_path(n) for n in LINEAR_PARENTS]
            raise ConfigError(f"adapter.target_modules entry {pattern!r} matches no module; modules are named like "
                              f"{paths} (layers 0..{num_layers - 1})")
        for name in hits:
            per_layer = [matches(pattern, module_path(name, i)) for i in range(num_layers)]
            if not all(per_layer):
                raise ConfigError(f"adapter.target_modules entry {pattern!r} selects {name} in only some layers; "
                                  "adapters go on every layer (a layer subset is not supported)")
        selected += [h for h in hits if h not in selected]
    return [n for n in LINEAR_PARENTS if n in selected]


def apply_adapters(model: CausalLM, adapter: AdapterConfig | str, *, seed: int = 0) -> CausalLM:
    """Adds the adapter's experts and routers beside the frozen linears of `model` (in place) and returns it."""
    config = preset(adapter) if isinstance(adapter, str) else adapter
    if model.adapter_config is not None:
        raise ConfigError("the model already has adapters; load a fresh model to apply another adapter")
    model_config = model.config
    names = targeted_linears(config, model_config.num_layers)
    rngs = nnx.Rngs(seed)
    layers = model.layers
    num_layers = model_config.num_layers
    ffn_names = [n for n in names if n in FFN_MODULES]
    if config.ffn_moe and ffn_names and set(ffn_names) != set(FFN_MODULES):
        raise ConfigError(f"adapter.ffn_moe experts are whole FFNs: target all of {FFN_MODULES} (got {ffn_names})")
    for name in names:
        parent = getattr(layers, LINEAR_PARENTS[name])
        base = getattr(parent, name)
        d_in, d_out = base.kernel.shape[-2:]
        if config.rank > min(d_in, d_out):
            raise ConfigError(f"adapter.rank={config.rank} exceeds {name}'s smaller dimension {min(d_in, d_out)} "
                              f"({d_in} -> {d_out}); use a rank of at most {min(d_in, d_out)}")
    if config.ffn_moe and ffn_names:
        layers.mlp = MoEFeedForward(layers.mlp, "mlp", config, rngs=rngs, layers=num_layers)
    for name in names:
        if config.ffn_moe and name in FFN_MODULES:
            continue
        parent = getattr(layers, LINEAR_PARENTS[name])
        plain = config.ffn_moe  # MixLoRA/SLIM: plain LoRA beside attention, experts live in the FFN
        setattr(parent, name, AdaptedLinear(
            getattr(parent, name), f"{LINEAR_PARENTS[name]}.{name}", config,
            num_experts=1 if plain else config.num_experts, top_k=0 if plain else config.top_k,
            shared_a=config.shared_a and not plain, rngs=rngs, layers=num_layers))
    model.adapter_config = config
    return model


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """(graphdef, trainable adapters and routers, non-trainable adapter state, frozen base)."""
    return nnx.split(model, nnx.LoRAParam, AdapterState, ...)


def merge_model(graphdef: nnx.GraphDef, trainable: nnx.State, adapter_state: nnx.State, base: nnx.State) -> Any:
    """The model back from `split_model`'s parts. Its variables are fresh objects of the current trace, so a forward
    inside `jax.grad`/`jax.jit` may update the adapter state without touching the caller's."""
    fresh = jax.tree.map(lambda x: x, (trainable, adapter_state, base))
    return nnx.merge(graphdef, *fresh)


def _plain_lora_modules(model: CausalLM) -> list[AdaptedLinear]:
    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, AdaptedLinear)]
    for m in modules:
        if m.router is not None:
            raise ConfigError(f"{m.name} has a router: a routed mixture cannot be merged into one weight; only "
                              "plain LoRA (one expert, no router) can")
    return modules


def merge_lora(model: CausalLM) -> CausalLM:
    """Adds s * A B into each base kernel (in place); the forward then skips the adapter."""
    for m in _plain_lora_modules(model):
        if not m.merged:
            _add_delta(m, +1.0)
            m.merged = True
    return model


def unmerge_lora(model: CausalLM) -> CausalLM:
    """Undoes `merge_lora`."""
    for m in _plain_lora_modules(model):
        if m.merged:
            _add_delta(m, -1.0)
            m.merged = False
    return model


def _add_delta(m: AdaptedLinear, sign: float) -> None:
    kernel = m.base.kernel
    a, b = m.experts.lora_a[...], m.experts.lora_b[...]
    delta = m.config.scaling * jnp.einsum("...dr,...rf->...df", a[..., 0, :, :], b[..., 0, :, :])
    kernel.set_value((kernel[...].astype(jnp.float32) + sign * delta).astype(kernel[...].dtype))
