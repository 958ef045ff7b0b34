"""The experiment configuration: typed dataclasses per section, filled from a YAML file and `section.field=value`
overrides by OmegaConf, which rejects unknown keys and wrong types; each section validates its values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxmoelora.adapters.config import METHODS, AdapterConfig, preset
from jaxmoelora.data.config import DataConfig
from jaxmoelora.errors import ConfigError, JaxMoeLoraError
from jaxmoelora.models.config import DTYPES, REMAT_POLICIES

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class ModelOptions:
    path: str = "smollm2-135m"  # Hugging Face directory, .gguf file or a known name
    dtype: str = "float32"  # compute dtype; "bfloat16" keeps adapters and optimizer state in fp32
    param_dtype: str | None = None  # storage dtype of the frozen base (default: dtype)
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str = "full"  # with remat: "full" or "save_dots" (jaxmoelora.models.config.REMAT_POLICIES)

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r} is unknown; use one of "
                              f"{sorted(REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"model.{name}={value!r} is not a dtype; use one of {sorted(DTYPES)}")


@dataclasses.dataclass
class TrainOptions:
    steps: int = 100
    learning_rate: float = 2e-4  # LoRAMoE/HydraLoRA/MixLoRA scripts [code]
    router_learning_rate: float | None = None  # a separate rate for routers (default: learning_rate)
    schedule: str = "cosine"
    warmup_ratio: float = 0.03  # LoRAMoE run_loramoe.sh [code]
    warmup_steps: int | None = None  # overrides warmup_ratio
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    grad_clip: float = 1.0  # global norm; 0 disables
    grad_accum_steps: int = 1  # the global batch is split into this many micro-batches per step
    seed: int = 0
    # JAX's persistent compilation cache: a rerun or resume with the same shapes skips compiling; empty turns it off.
    compilation_cache_dir: str | None = "~/.cache/jaxmoelora/jax_compilation"

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"train.steps={self.steps} must be at least 1")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate={self.learning_rate} must be positive")
        if self.router_learning_rate is not None and self.router_learning_rate <= 0:
            raise ConfigError(f"train.router_learning_rate={self.router_learning_rate} must be positive")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r} is unknown; use one of {SCHEDULES}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be in [0, train.steps={self.steps})")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} must be at least 1")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * self.steps)


@dataclasses.dataclass
class MeshOptions:
    """Device mesh axis sizes; one may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}={size} must be a positive size or -1")

    def axis_sizes(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckpointOptions:
    save_every: int = 50  # steps between checkpoints (asynchronous)
    keep: int = 3  # the newest checkpoints kept
    async_save: bool = True
    resume: bool = True  # continue from the newest valid checkpoint in output_dir

    def __post_init__(self):
        if self.save_every < 1:
            raise ConfigError(f"checkpoint.save_every={self.save_every} must be at least 1")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.keep} must be at least 1")


@dataclasses.dataclass
class LogOptions:
    every: int = 1  # steps between metric records
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"log.every={self.every} must be at least 1")


@dataclasses.dataclass
class EvalOptions:
    """Held-out exact-match accuracy (data.eval_size/eval_fraction records) before and after training."""

    examples: int = 0  # 0 = no evaluation
    max_new_tokens: int = 192
    batch_size: int = 16
    show: int = 3  # generations printed after training

    def __post_init__(self):
        if self.examples < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("eval.examples must be >= 0, eval.max_new_tokens and eval.batch_size >= 1")


@dataclasses.dataclass
class DistributedOptions:
    """Multi-host set-up for `jax.distributed.initialize`; by default taken from the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a TPU/SLURM cluster)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass
class ExperimentConfig:
    output_dir: str = "runs/default"
    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(builder="gsm_symbolic"))
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    mesh: MeshOptions = dataclasses.field(default_factory=MeshOptions)
    checkpoint: CheckpointOptions = dataclasses.field(default_factory=CheckpointOptions)
    log: LogOptions = dataclasses.field(default_factory=LogOptions)
    eval: EvalOptions = dataclasses.field(default_factory=EvalOptions)
    distributed: DistributedOptions = dataclasses.field(default_factory=DistributedOptions)

    def __post_init__(self):
        if self.data.batch_size % self.train.grad_accum_steps:
            raise ConfigError(f"data.batch_size={self.data.batch_size} must be a multiple of "
                              f"train.grad_accum_steps={self.train.grad_accum_steps} (each step splits the batch "
                              "into that many micro-batches)")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}


def _section_schemas(adapter_preset: str | None, data_path_given: bool) -> dict[str, Any]:
    """OmegaConf schema per section; the adapter section's defaults are the chosen method's preset, and the data
    come from the gsm_symbolic builder unless a data.path is given."""
    adapter_defaults = preset(adapter_preset) if adapter_preset else AdapterConfig()
    adapter_node = OmegaConf.structured(adapter_defaults)
    OmegaConf.set_readonly(adapter_node, False)
    return {
        "output_dir": "runs/default",
        "model": OmegaConf.structured(ModelOptions),
        "adapter": adapter_node,
        "data": OmegaConf.structured(DataConfig if data_path_given else DataConfig(builder="gsm_symbolic")),
        "train": OmegaConf.structured(TrainOptions),
        "mesh": OmegaConf.structured(MeshOptions),
        "checkpoint": OmegaConf.structured(CheckpointOptions),
        "log": OmegaConf.structured(LogOptions),
        "eval": OmegaConf.structured(EvalOptions),
        "distributed": OmegaConf.structured(DistributedOptions),
    }


def load_experiment(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The experiment from a YAML file (optional) and `section.field=value` overrides, validated.

    The adapter section starts from the preset named by `adapter.method` (in the file or the overrides), so
    `adapter.method: loramoe` alone gives LoRAMoE's defaults."""
    try:
        file_cfg = OmegaConf.create({})
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist; the configs/ folder has one per method")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of sections (model, adapter, data, train, ...)")
            file_cfg = OmegaConf.create(loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.field=value, e.g. train.steps=200")
        override_cfg = OmegaConf.from_dotlist(list(overrides))
        merged_raw = OmegaConf.merge(file_cfg, override_cfg)
        unknown = sorted(set(merged_raw.keys()) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections are {sorted(SECTIONS)}")
        method = OmegaConf.select(merged_raw, "adapter.method", default=None)
        if method is not None and method not in METHODS:
            raise ConfigError(f"adapter.method={method!r} is unknown; choose one of {METHODS}")
        data_path = OmegaConf.select(merged_raw, "data.path", default=None)
        schema = OmegaConf.create(_section_schemas(method, data_path is not None))
        OmegaConf.set_struct(schema, True)
        merged = OmegaConf.merge(schema, file_cfg, override_cfg)
        sections = {name: OmegaConf.to_object(merged[name]) if name != "output_dir" else merged[name]
                    for name in SECTIONS}
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    except JaxMoeLoraError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    return ExperimentConfig(**sections)


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    first = str(e).splitlines()[0]
    if type(e).__name__ == "ConfigKeyError":
        return f"unknown config key {key!r}: {first}"
    return f"config field {key!r}: {first}"


def experiment_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds a config saved with `to_dict` (the copy kept beside every checkpoint)."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in _flatten(values)]
    return load_experiment(None, overrides)


def _flatten(values: dict[str, Any], prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
