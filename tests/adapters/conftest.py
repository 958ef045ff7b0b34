"""Compile-time settings for the adapter tests, put back after each module.

The tests compile many small programs (each preset's training step, random arrays of new shapes), and on a 2-core CPU
XLA's compile time dominates their run time. Two settings change how fast programs compile, not what they compute:
- the classic threefry PRNG instead of jax's default partitionable one, whose every new shape takes seconds to compile
  on CPU; both are correct PRNGs and nothing here depends on which bits come out;
- XLA's optimisation passes off (`jax_disable_most_optimizations`), which halves the compile of a training step.
The sharded tests run in subprocesses with jax's defaults, and the benchmarks measure the optimised programs."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def fast_compiling_jax():
    settings = {"jax_threefry_partitionable": False, "jax_disable_most_optimizations": True}
    previous = {"jax_threefry_partitionable": jax.config.jax_threefry_partitionable,
                "jax_disable_most_optimizations": jax.config.read("jax_disable_most_optimizations")}
    for name, value in settings.items():
        jax.config.update(name, value)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
