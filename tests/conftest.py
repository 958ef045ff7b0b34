"""Shared fixtures: a tiny random Llama checkpoint in Hugging Face layout, written without torch."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoint import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint shared by the session; copy it before changing anything in it."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
