"""Text generation: sampling rules and the compiled, batched prefill + decode loop."""

from jaxmoelora.generation.generate import (
    GenerationConfig,
    GenerationResult,
    bucket,
    clear_compiled_cache,
    generate,
    generate_detailed,
    generate_ids,
    generate_ids_detailed,
    left_pad,
    stop_and_pad_ids,
    trace_count,
)
from jaxmoelora.generation.sampling import greedy, sample, sampling_mode, top_p_logits, top_p_mask

__all__ = [
    "GenerationConfig", "GenerationResult", "bucket", "clear_compiled_cache", "generate", "generate_detailed",
    "generate_ids", "generate_ids_detailed", "left_pad", "stop_and_pad_ids", "trace_count",
    "greedy", "sample", "sampling_mode", "top_p_logits", "top_p_mask",
]
