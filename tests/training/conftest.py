"""Fixtures for the training tests (their helpers are in training_helpers.py): the tiny chat model and data, fast
compile settings with a compilation cache shared by the session and its subprocesses, and the shared runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import FAST_JAX, SharedRuns, write_arithmetic_jsonl, write_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def arithmetic_jsonl(tmp_path_factory) -> Path:
    return write_arithmetic_jsonl(tmp_path_factory.mktemp("data") / "sums.jsonl")


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-compilation-cache")


@pytest.fixture(autouse=True, scope="module")
def fast_compiling_jax(compilation_cache):
    import jax
    from jax._src import compilation_cache as cc

    def current(name):  # state flags are attributes, plain flags are read
        return getattr(jax.config, name) if hasattr(jax.config, name) else jax.config.read(name)

    settings = {**FAST_JAX, "jax_compilation_cache_dir": str(compilation_cache)}
    previous = {name: current(name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    cc.reset_cache()  # take the directory even if another module already used (or skipped) the cache
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_chat_model, arithmetic_jsonl, compilation_cache) -> SharedRuns:
    return SharedRuns(tmp_path_factory.mktemp("shared-runs"), tiny_chat_model, arithmetic_jsonl, compilation_cache)
