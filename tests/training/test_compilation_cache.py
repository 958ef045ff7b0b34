"""The persistent compilation cache: a second process loads its executables from disk; the user's choice wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxmoelora.training.config import load_experiment

COMPILE_ONE_FUNCTION = """
import sys, jax, jax.numpy as jnp
from jaxmoelora.training.compilation_cache import enable_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, *args, **kwargs: events.append(name))
print("DIR", enable_compilation_cache(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x @ x.T) + 1)(jnp.ones((32, 32))))
print("HIT" if "/jax/compilation_cache/cache_hits" in events else "MISS")
"""


def run(directory: str, extra_env: dict[str, str] | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(extra_env or {})
    done = subprocess.run([sys.executable, "-c", COMPILE_ONE_FUNCTION, directory], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_second_process_loads_its_executable_from_the_cache(tmp_path):
    cache = tmp_path / "nested" / "cache"
    assert run(str(cache)) == ["DIR", str(cache), "MISS"]
    assert any(cache.iterdir())  # the executable was written
    assert run(str(cache)) == ["DIR", str(cache), "HIT"]


def test_the_users_cache_directory_wins_and_an_empty_one_turns_the_cache_off(tmp_path):
    user = tmp_path / "user"
    assert run(str(tmp_path / "ours"), {"JAX_COMPILATION_CACHE_DIR": str(user)}) == ["DIR", str(user), "MISS"]
    assert not (tmp_path / "ours").exists()
    assert run("") == ["DIR", "None", "MISS"]


def test_the_training_config_turns_the_cache_off_with_an_empty_directory(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: some/model}\ndata: {path: train.jsonl}\n")
    assert Path(load_experiment(path).train.compilation_cache_dir).parts[:3] == ("~", ".cache", "jaxmoelora")
    assert load_experiment(path, ["train.compilation_cache_dir="]).train.compilation_cache_dir in ("", None)
