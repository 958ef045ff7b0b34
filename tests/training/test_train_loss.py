"""Training lowers the loss on the tiny model for every method (12 steps at learning rate 0.01)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxmoelora.adapters.config import METHODS


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_for_every_method(runs, method):
    run = runs.reference(method)
    losses = run.losses
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses), losses
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.92 * first, f"{method}: mean loss {first:.3f} over the first 3 steps -> {last:.3f} over the last 3"
    assert [h["step"] for h in run.result.history] == list(range(1, 13))
