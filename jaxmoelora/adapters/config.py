"""One typed adapter configuration for every method, with a named preset per method.

Defaults name their source: [code] official repository, [paper] the paper, [choice] a decision of this project where the
sources are silent (see ../shared/METHODS.md section 8; each such choice is a field here).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from jaxmoelora.errors import ConfigError

METHODS = ("lora", "loramoe", "moelora", "slim", "moral", "mixlora", "hydralora")
ROUTINGS = ("none", "dense", "topk")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Where adapters go, their shape, routing, auxiliary losses and initialisation."""

    method: str = "lora"
    # Per-linear adapters: PEFT-style names ("q_proj") or regexes (".*mlp.*") matched against module paths such as
    # "model.layers.0.self_attn.q_proj".
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (PEFT's use_rslora)
    dropout: float = 0.0  # on the adapter input; re-sampled per expert (LoRAMoE [code])
    num_experts: int = 1
    top_k: int = 0  # 0 = dense routing over all experts
    shared_a: bool = False  # HydraLoRA: one A shared by all B heads
    # FFN-level mixture (MixLoRA, SLIM): each expert is the frozen FFN plus its own LoRA on gate/up/down; the router is
    # one per layer. Attention modules listed in target_modules get plain LoRA.
    ffn_moe: bool = False
    num_identity_experts: int = 0  # SLIM: experts whose delta is zero (the frozen FFN alone)
    renormalize_topk: bool = True  # top-k weights divided by their sum (MixLoRA [code], SLIM [paper])
    # Initialisation.
    init_a: str = "kaiming_uniform"  # kaiming_uniform(a=sqrt 5) as PEFT/LoRAMoE [code], or "normal"
    init_b: str = "zeros"
    router_init: str = "kaiming_uniform"  # LoRAMoE/HydraLoRA [code]; MixLoRA uses normal(0.02) [code]
    router_init_range: float = 0.02
    # LoRAMoE localized balancing constraint (LBC) [code: peft/tuners/lora.py].
    lbc_weight: float = 0.0  # beta
    lbc_delta: float = 0.0  # delta (blc_alpha)
    lbc_mask_padding: bool = False  # the official code sums padding into Q; True leaves it out
    # Switch/Mixtral load balancing [code: MixLoRA _mixtral_load_balancing_loss_func], padding masked.
    load_balance_weight: float = 0.0
    # MoELoRA expert contrastive loss (InfoNCE) [paper, details are [choice]].
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.07  # [choice]
    contrastive_tokens: int = 32  # [choice] tokens sampled per adapted linear per step
    # SLIM [paper, details [choice]].
    num_clusters: int = 0  # sliding-clustering centres for weight yielding; 0 = off
    cluster_momentum: float = 0.01  # [choice] sliding update rate of centres and sigmas
    yield_strength: float = 1.0  # [choice] gamma: identity logits += gamma * relu(d)
    merge_drop_rate: float = 0.0  # dynamic merging: share of B's rows x A's columns dropped, re-sampled per step
    merge_rescale: bool = False  # [choice] DARE's 1/(1-p) rescale of the kept entries
    merge_at_inference: bool = False  # [choice] keep masking at inference
    l1_weight: float = 0.0  # L1 on the adapters, normalised by r*C_out and r*C_in [paper]

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.method not in METHODS:
            raise ConfigError(f"adapter.method={self.method!r} is unknown; choose one of {METHODS}")
        if not self.target_modules:
            raise ConfigError("adapter.target_modules is empty; name the linears to adapt, e.g. ['q_proj', 'v_proj']")
        if self.rank < 1:
            raise ConfigError(f"adapter.rank={self.rank} must be at least 1")
        if self.num_experts < 1:
            raise ConfigError(f"adapter.num_experts={self.num_experts} must be at least 1")
        if self.top_k < 0 or self.top_k > self.num_experts:
            raise ConfigError(f"adapter.top_k={self.top_k} must be between 0 (dense) and num_experts="
                              f"{self.num_experts}; lower top_k or raise num_experts")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.merge_drop_rate < 1.0:
            raise ConfigError(f"adapter.merge_drop_rate={self.merge_drop_rate} must be in [0, 1)")
        if self.lbc_weight and self.num_experts % 2:
            raise ConfigError(f"adapter.num_experts={self.num_experts} must be even for LoRAMoE's balancing "
                              "constraint (two halves: world knowledge and downstream experts)")
        if self.ffn_moe and self.top_k < 1:
            raise ConfigError("adapter.ffn_moe routes each token to its top-k FFN experts: set top_k to at least 1 "
                              "(MixLoRA and SLIM use 2); a dense FFN-level mixture is not supported")
        if self.num_identity_experts and not self.ffn_moe:
            raise ConfigError("adapter.num_identity_experts needs ffn_moe=true (identity experts are whole FFNs)")
        if self.num_identity_experts >= self.num_experts:
            raise ConfigError(f"adapter.num_identity_experts={self.num_identity_experts} must be below "
                              f"num_experts={self.num_experts}: at least one expert must be a LoRA expert")
        if self.num_clusters and not self.num_identity_experts:
            raise ConfigError("adapter.num_clusters (SLIM weight yielding) needs num_identity_experts > 0")
        if self.shared_a and self.top_k:
            raise ConfigError("adapter.shared_a (HydraLoRA) uses dense routing; set top_k=0")
        for pattern in self.target_modules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"adapter.target_modules entry {pattern!r} is not a valid regex: {e}") from e

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)

    @property
    def has_router(self) -> bool:
        return self.num_experts > 1

    @property
    def num_lora_experts(self) -> int:
        return self.num_experts - self.num_identity_experts

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown adapter field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, AdapterConfig] = {
    # Plain LoRA (PEFT defaults: r 8, alpha 16, q/v).
    "lora": AdapterConfig(method="lora", target_modules=("q_proj", "v_proj"), rank=8, alpha=16.0),
    # LoRAMoE [code run_loramoe.sh]: gate/up/down, r 4, alpha 32, dropout 0.05; N 6 and delta = beta = 0.1 [paper].
    "loramoe": AdapterConfig(method="loramoe", target_modules=FFN_MODULES, rank=4, alpha=32.0, dropout=0.05,
                             num_experts=6, lbc_weight=0.1, lbc_delta=0.1),
    # MoELoRA (Luo et al.) [paper]: 8 experts top-2 on q/v; rank 4 = a rank-32 LoRA split in 8 [choice];
    # load balance 0.01 and contrastive 0.01 [choice].
    "moelora": AdapterConfig(method="moelora", target_modules=("q_proj", "v_proj"), rank=4, alpha=8.0,
                             num_experts=8, top_k=2, load_balance_weight=0.01, contrastive_weight=0.01),
    # SLIM [paper]: FFN mixture of 10 experts (2 identity), top-2 renormalised, LoRA on attention, r 16 as its
    # baselines; clusters, drop rate and L1 weight are [choice].
    "slim": AdapterConfig(method="slim", target_modules=ATTENTION_MODULES + FFN_MODULES, rank=16, alpha=32.0,
                          ffn_moe=True, num_experts=10, num_identity_experts=2, top_k=2, num_clusters=4,
                          merge_drop_rate=0.1, l1_weight=1e-4),
    # MoRAL [paper]: top-k LoRA experts on the FFN with load balancing; N 8, k 2, r 8 are [choice].
    "moral": AdapterConfig(method="moral", target_modules=FFN_MODULES, rank=8, alpha=16.0, num_experts=8, top_k=2,
                           load_balance_weight=0.01),
    # MixLoRA [code templates/mixlora.json]: FFN experts with LoRA on gate/up/down, top-2 of 8, r 16, alpha 32,
    # dropout 0.05, router normal(0.02), aux coefficient 0.01 [README]; plain LoRA on q/k/v/o.
    "mixlora": AdapterConfig(method="mixlora", target_modules=ATTENTION_MODULES + FFN_MODULES, rank=16,
                             alpha=32.0, dropout=0.05, ffn_moe=True, num_experts=8, top_k=2,
                             router_init="normal", load_balance_weight=0.01),
    # HydraLoRA [code fine-tuning.sh]: shared A, 4 B heads, dense router, gate/up/down, r 4, alpha 32, dropout 0.05.
    "hydralora": AdapterConfig(method="hydralora", target_modules=FFN_MODULES, rank=4, alpha=32.0, dropout=0.05,
                               num_experts=4, shared_a=True),
}


def preset(name: str, **overrides: Any) -> AdapterConfig:
    """The named method's defaults, with `overrides` applied (validated again)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown adapter preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
