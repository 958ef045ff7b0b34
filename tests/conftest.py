"""Shared fixtures: a tiny random Llama checkpoint in Hugging Face layout, written without torch."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# JAX's compilation cache goes to a directory of this session, not the user's ~/.cache (the trainer turns the cache on);
# set before jax is imported so this process and the runs it starts use it.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxmoelora-tests-xla-cache-")

import pytest  # noqa: E402
from tiny_checkpoint import write_tiny_llama  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint shared by the session; copy it before changing anything in it."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
