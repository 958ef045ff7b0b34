"""JAX's persistent compilation cache, so a resumed or repeated run skips most of its compilation.

A second process with the same model, method and shapes loads its executables from disk instead of compiling them
(MaxText and levanter turn the cache on the same way): on 2 CPU cores the SmolLM2 LoRAMoE step's first result came
after 26-28 s instead of 36 s (BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import jax

CACHE_MAX_BYTES = 4 * 2 ** 30  # least recently used executables are evicted beyond this


def enable_compilation_cache(directory: str | None) -> Path | None:
    """Points JAX's persistent compilation cache at `directory` (created if missing) and returns it.

    Nothing changes when `directory` is empty or None, or when the cache directory was already chosen, for example
    through the JAX_COMPILATION_CACHE_DIR environment variable: the user's choice wins and is returned. It takes effect
    only if nothing was compiled in this process before (JAX decides once per process whether to use the cache)."""
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    if not directory:
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: no limit
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path
