"""Variable types of the adapters. Everything trainable subclasses `nnx.LoRAParam`, so the one filter
`nnx.LoRAParam` selects experts and routers alike and nothing of the frozen base (plain `nnx.Param`)."""

from flax import nnx


class ExpertParam(nnx.LoRAParam):
    """LoRA expert factors A (experts, d_in, rank) and B (experts, rank, d_out)."""


class RouterParam(nnx.LoRAParam):
    """Router weights (d_in, experts), kept in fp32."""


class AdapterState(nnx.Variable):
    """Non-trainable adapter state updated in training (SLIM's cluster centres and sigmas)."""


TRAINABLE = nnx.LoRAParam
ADAPTER_VARIABLES = nnx.Any(nnx.LoRAParam, AdapterState)  # everything an adapter checkpoint holds
