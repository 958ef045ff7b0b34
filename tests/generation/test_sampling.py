"""The next-token rules: greedy is argmax, top-p keeps what transformers' TopPLogitsWarper keeps, sampling is seeded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoelora.generation.sampling import greedy, sample, sampling_mode, top_p_logits, top_p_mask


def reference_top_p_keep(logits_v: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper, transcribed: sort ascending, drop tokens whose cumulative probability is
    <= 1 - top_p, never drop the most likely token."""
    order = np.argsort(logits_v, kind="stable")
    probs = np.exp(logits_v[order] - logits_v.max())
    probs /= probs.sum()
    remove_sorted = np.cumsum(probs) <= 1 - top_p
    remove_sorted[-1] = False
    keep = np.ones_like(logits_v, bool)
    keep[order[remove_sorted]] = False
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.9, 0.99])
def test_top_p_keeps_the_same_tokens_as_the_transformers_warper(top_p):
    rng = np.random.default_rng(0)
    logits_bv = rng.normal(scale=3.0, size=(8, 257)).astype(np.float64)
    keep_bv = np.asarray(top_p_mask(jnp.asarray(logits_bv, jnp.float32), top_p))
    for row in range(logits_bv.shape[0]):
        np.testing.assert_array_equal(keep_bv[row], reference_top_p_keep(logits_bv[row], top_p))


def test_top_p_renormalises_over_the_kept_set():
    rng = np.random.default_rng(1)
    logits_bv = rng.normal(scale=2.0, size=(4, 100))
    probs_bv = np.asarray(jax.nn.softmax(top_p_logits(jnp.asarray(logits_bv, jnp.float32), 0.8), axis=-1))
    for row in range(4):
        keep = reference_top_p_keep(logits_bv[row], 0.8)
        expected = np.where(keep, np.exp(logits_bv[row]), 0.0)
        np.testing.assert_allclose(probs_bv[row], expected / expected.sum(), rtol=1e-5, atol=1e-7)
        assert probs_bv[row][keep].sum() == pytest.approx(1.0, abs=1e-5)
        # The kept set is the smallest nucleus: it reaches top_p, and without its least likely member it does not.
        full = np.exp(logits_bv[row] - logits_bv[row].max())
        full /= full.sum()
        assert full[keep].sum() >= 0.8
        assert full[keep].sum() - full[keep].min() < 0.8


def test_top_p_always_keeps_the_top_token():
    logits_bv = jnp.asarray([[10.0, 0.0, -1.0], [0.0, 0.1, 0.2]])
    keep_bv = np.asarray(top_p_mask(logits_bv, 1e-6))
    np.testing.assert_array_equal(keep_bv, [[True, False, False], [False, False, True]])


def test_greedy_is_argmax():
    logits_bv = jax.random.normal(jax.random.key(0), (5, 33))
    np.testing.assert_array_equal(np.asarray(greedy(logits_bv)), np.argmax(np.asarray(logits_bv), axis=-1))
    assert sampling_mode(0.0, 0.5) == "greedy"
    np.testing.assert_array_equal(np.asarray(sample(logits_bv, jax.random.key(3), temperature=0.0)),
                                  np.argmax(np.asarray(logits_bv), axis=-1))


def test_temperature_sampling_is_reproducible_with_a_fixed_key():
    logits_bv = jax.random.normal(jax.random.key(0), (64, 50))
    draw = lambda seed: np.asarray(sample(logits_bv, jax.random.key(seed), temperature=0.7))  # noqa: E731
    np.testing.assert_array_equal(draw(1), draw(1))
    assert (draw(1) != draw(2)).any()


def test_top_p_sampling_draws_only_from_the_nucleus():
    logits_bv = jnp.tile(jnp.asarray([[3.0, 2.5, 0.0, -1.0, -2.0]]), (2000, 1))
    keep_v = np.asarray(top_p_mask(logits_bv[:1], 0.7))[0]
    tokens_b = np.asarray(sample(logits_bv, jax.random.key(0), temperature=1.0, top_p=0.7))
    assert set(np.unique(tokens_b)) <= set(np.flatnonzero(keep_v))
    assert len(np.unique(tokens_b)) == keep_v.sum()


def test_low_temperature_sampling_approaches_greedy_and_high_temperature_spreads():
    logits_bv = jnp.tile(jnp.asarray([[1.0, 0.5, 0.0, -0.5]]), (2000, 1))
    cold_b = np.asarray(sample(logits_bv, jax.random.key(0), temperature=0.01))
    hot_b = np.asarray(sample(logits_bv, jax.random.key(0), temperature=100.0))
    assert (cold_b == 0).all()
    counts = np.bincount(hot_b, minlength=4) / hot_b.size
    np.testing.assert_allclose(counts, 0.25, atol=0.05)
