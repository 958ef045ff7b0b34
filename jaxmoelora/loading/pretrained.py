"""`from_pretrained`: a Hugging Face directory (or GGUF file, or a known name) -> a sharded Flax NNX model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxmoelora.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError
from jaxmoelora.loading.safetensors_checkpoint import SafetensorsCheckpoint
from jaxmoelora.models.config import DTYPES, SUPPORTED_ARCHITECTURES, ModelConfig
from jaxmoelora.models.decoder import CausalLM, abstract_model
from jaxmoelora.sharding.rules import DEFAULT_RULES, make_mesh, shard_model, variable_sharding


def resolve(path: str | Path) -> Path:
    """A Hugging Face directory for `path`: a directory as is; a .gguf file or a known name converted once (cached)."""
    if Path(path).is_dir():
        return Path(path)
    from jaxmoelora.loading.assets import resolve_model_path
    return Path(resolve_model_path(str(path)))


def load_config(path: str | Path, **overrides: Any) -> ModelConfig:
    import transformers
    directory = resolve(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.json; pass a Hugging Face model directory or a .gguf file")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {config_file}: {e}; it must be a JSON object") from e
    # Before AutoConfig, which rejects model types it does not know with a message about upgrading transformers.
    if architectures and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise UnsupportedArchitectureError(f"{config_file} names architecture {architectures}, which is not supported; "
                                           f"jaxmoelora implements {sorted(SUPPORTED_ARCHITECTURES)}")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as e:
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {e}") from e
    return ModelConfig.from_hf(hf_config, **overrides)


def hf_tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """Hugging Face name of the tensor behind our variable at `path` (layer index inserted for stacked layers)."""
    parts = list(path)
    leaf = {"kernel": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    parts[-1] = leaf
    if parts[0] == "layers":
        parts.insert(1, str(layer))
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def from_pretrained(path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh: Mesh | None = None, rules=DEFAULT_RULES, scan_layers: bool = True,
                    remat: bool = False, remat_policy: str = "full", adapter=None,
                    adapter_seed: int = 0) -> CausalLM:
    """Loads a Llama-family model.

    `path` is a Hugging Face directory (single or sharded safetensors), a .gguf file, or `smollm2-135m`. Each tensor is
    read from disk region by region and placed straight onto its sharding in `mesh` (one device if None), so a process
    holds at most its own shards. `dtype` is the compute dtype, `param_dtype` the storage dtype (defaults to `dtype`).
    `adapter` (an `AdapterConfig` or a preset name such as "loramoe") adds experts and routers, sharded by the same
    rules; they are initialised from `adapter_seed`.
    """
    overrides: dict[str, Any] = dict(scan_layers=scan_layers, remat=remat, remat_policy=remat_policy)
    if dtype is not None:
        overrides["dtype"] = dtype
        overrides["param_dtype"] = param_dtype or dtype
    elif param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    directory = resolve(path)
    config = load_config(directory, **overrides)
    checkpoint = SafetensorsCheckpoint(directory)
    mesh = mesh or make_mesh({"data": 1}, devices=jax.local_devices()[:1])
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    for path_tuple, variable in nnx.to_flat_state(state):
        sharding = variable_sharding(variable, mesh, rules)
        variable.set_value(_load_variable(checkpoint, tuple(str(p) for p in path_tuple), variable, sharding,
                                          DTYPES[config.param_dtype]))
        checkpoint.release()  # this variable is on its devices now; unmap what was read for it
    model = nnx.merge(graphdef, state)
    if adapter is not None:
        from jaxmoelora.adapters.apply import apply_adapters
        from jaxmoelora.adapters.variables import ADAPTER_VARIABLES
        apply_adapters(model, adapter, seed=adapter_seed)
        shard_model(model, mesh, rules, only=ADAPTER_VARIABLES)
    return model


def _load_variable(checkpoint: SafetensorsCheckpoint, path: tuple[str, ...], variable: nnx.Variable,
                   sharding: jax.sharding.Sharding, dtype) -> jax.Array:
    value = variable.get_value()
    shape = tuple(value.shape)
    stacked = path[0] == "layers"
    transpose = path[-1] == "kernel"
    per_layer_shape = shape[1:] if stacked else shape
    expected_hf_shape = per_layer_shape[::-1] if transpose else per_layer_shape
    names = [hf_tensor_name(path, i) for i in range(shape[0])] if stacked else [hf_tensor_name(path, None)]
    if path[0] == "lm_head" and names[0] not in checkpoint:
        raise CheckpointError(
            f"{checkpoint.directory} has no lm_head.weight but its config.json says tie_word_embeddings=false; "
            "set tie_word_embeddings=true if the output layer shares the input embedding")
    for name in names:
        found = checkpoint.shape(name)
        if found != expected_hf_shape:
            raise CheckpointError(
                f"tensor {name!r} in {checkpoint.file_of(name)} has shape {found}, but config.json implies "
                f"{expected_hf_shape}; the checkpoint and its config.json do not match")

    def read_region(index: tuple[slice, ...]) -> np.ndarray:
        ranges = [s.indices(n) for s, n in zip(index, shape)]
        layer_range, inner = (ranges[0], ranges[1:]) if stacked else ((0, 1, 1), ranges)
        region = tuple(slice(a, b) for a, b, _ in (inner[::-1] if transpose else inner))
        pieces = []
        for layer in range(*layer_range):
            piece = checkpoint.read(names[layer], region)
            pieces.append(piece.T if transpose else piece)
        out = np.stack(pieces) if stacked else pieces[0]
        return out.astype(jnp.dtype(dtype), copy=False)

    return jax.make_array_from_callback(shape, sharding, read_region)


# Files from which transformers can build a tokenizer (fast, sentencepiece, or byte-level BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer of a model directory, .gguf file or known model name."""
    import transformers
    directory = resolve(path)
    found = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not found:
        raise TokenizerError(f"cannot build a tokenizer from {directory}: it has none of {list(TOKENIZER_FILES)}; "
                             "copy the model's tokenizer.json and tokenizer_config.json into it")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise TokenizerError(f"cannot build a tokenizer from {directory}: {e}; it needs tokenizer.json (or a "
                             "sentencepiece tokenizer.model) and tokenizer_config.json") from e
