"""The blocked causal attention of training and cache-free forwards against a plain per-head reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoelora.models import decoder
from jaxmoelora.models.decoder import cached_attention, causal_attention


def reference_attention(q_btnh, k_btkh, v_btkh, mask_btt):
    """softmax(q k^T / sqrt(h) over the visible keys) v, one batch row and query head at a time."""
    b, t, n, h = q_btnh.shape
    group = n // k_btkh.shape[2]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for head in range(n):
            kv = head // group
            scores_ts = q_btnh[bi, :, head] @ k_btkh[bi, :, kv].T / np.sqrt(h)
            scores_ts = np.where(mask_btt[bi], scores_ts, -np.inf)
            with np.errstate(invalid="ignore"):  # padding queries see no key; they are not compared
                scores_ts = scores_ts - scores_ts.max(axis=-1, keepdims=True)
                probs_ts = np.exp(scores_ts) / np.exp(scores_ts).sum(axis=-1, keepdims=True)
            out[bi, :, head] = probs_ts @ v_btkh[bi, :, kv]
    return out


def attention_inputs(t: int, seed: int = 0):
    """Two rows of grouped-query inputs: row 0 packs three segments, row 1 has 5 tokens of left padding; every mask
    is causal, and row 0 also has a sliding window of 40 tokens."""
    rng = np.random.default_rng(seed)
    b, n, k, h = 2, 6, 2, 8
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    keys = rng.normal(size=(b, t, k, h)).astype(np.float32)
    values = rng.normal(size=(b, t, k, h)).astype(np.float32)
    causal_tt = np.arange(t)[:, None] >= np.arange(t)[None, :]
    segments_t = np.minimum(np.arange(t) // (t // 3 + 1), 2)
    row0_tt = causal_tt & (segments_t[:, None] == segments_t[None, :])
    row0_tt &= (np.arange(t)[:, None] - np.arange(t)[None, :]) < 40
    valid_t = np.arange(t) >= 5
    row1_tt = causal_tt & valid_t[None, :]
    mask_btt = np.stack([row0_tt, row1_tt])
    query_valid_bt = np.stack([np.ones(t, bool), valid_t])
    return q, keys, values, mask_btt, query_valid_bt


@pytest.mark.parametrize("t", [37, 64, 150])
def test_causal_attention_matches_reference(t):
    """Single block, exactly one block, and three blocks with a partial last one (blocks of 64 queries)."""
    q, keys, values, mask_btt, query_valid_bt = attention_inputs(t)
    out = np.asarray(jax.jit(causal_attention)(q, keys, values, mask_btt))
    expected = reference_attention(q, keys, values, mask_btt)
    np.testing.assert_allclose(out[query_valid_bt], expected[query_valid_bt], atol=1e-5, rtol=1e-5)
    # The cache path (every key scored) agrees with the blocked one on real queries.
    full = np.asarray(cached_attention(q, keys, values, mask_btt))
    np.testing.assert_allclose(full[query_valid_bt], expected[query_valid_bt], atol=1e-5, rtol=1e-5)


def test_causal_attention_block_count_is_capped(monkeypatch):
    """Long sequences use larger blocks (at most MAX_ATTENTION_BLOCKS) and give the same result."""
    monkeypatch.setattr(decoder, "MAX_ATTENTION_BLOCKS", 2)
    q, keys, values, mask_btt, query_valid_bt = attention_inputs(150, seed=1)
    out = np.asarray(causal_attention(q, keys, values, mask_btt))
    expected = reference_attention(q, keys, values, mask_btt)
    np.testing.assert_allclose(out[query_valid_bt], expected[query_valid_bt], atol=1e-5, rtol=1e-5)


def test_causal_attention_gradients_match_unblocked():
    """Gradients with respect to q, k and v through the blocked attention equal those through the full one."""
    q, keys, values, mask_btt, query_valid_bt = attention_inputs(150, seed=2)
    weights = np.random.default_rng(3).normal(size=q.shape).astype(np.float32) * query_valid_bt[..., None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask_btt) * weights)

    blocked = jax.grad(loss(causal_attention), argnums=(0, 1, 2))(q, keys, values)
    full = jax.grad(loss(cached_attention), argnums=(0, 1, 2))(q, keys, values)
    for got, expected in zip(blocked, full):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-4)
