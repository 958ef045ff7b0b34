"""The adapter tests draw many random arrays of new shapes (initialisers, dropout and merge masks). On CPU each new
shape of the partitionable threefry PRNG (jax's default) takes seconds to compile, the classic threefry well under
one; both are correct PRNGs and nothing here depends on which bits come out, so these tests use the classic one and
put the setting back afterwards. The sharded tests run in subprocesses with jax's defaults."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def fast_compiling_prng():
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    yield
    jax.config.update("jax_threefry_partitionable", previous)
