"""The chunked head cross-entropy (gradient formed in the forward pass) against the loss on whole logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoelora.training.cross_entropy import head_cross_entropy


def reference_loss(hidden_btd, head_vd, targets_bt, mask_bt):
    """sum over masked tokens of logsumexp(logits) - logits[target], with the whole (b, t, vocab) logits."""
    logits_btv = jnp.einsum("btd,vd->btv", hidden_btd, head_vd)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum((lse_bt - target_bt) * mask_bt)


def inputs(b=3, t=21, d=16, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    head = rng.normal(size=(vocab, d)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.7).astype(np.int32)
    return hidden, head, targets, mask


@pytest.mark.parametrize("chunk_tokens", [1, 12, 30, 1000])  # one token, uneven chunks with padding, whole batch
def test_loss_and_gradient_match_whole_logits(chunk_tokens):
    hidden, head, targets, mask = inputs()
    expected_loss, expected_grad = jax.value_and_grad(reference_loss)(hidden, head, targets, mask.astype(np.float32))

    def loss(h):
        return 0.37 * head_cross_entropy(h, head, targets, mask, chunk_tokens)[0]  # a cotangent other than one

    value, grad = jax.jit(jax.value_and_grad(loss))(hidden)
    np.testing.assert_allclose(value, 0.37 * expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), 0.37 * np.asarray(expected_grad), atol=1e-6, rtol=1e-5)
    assert float(head_cross_entropy(hidden, head, targets, mask, chunk_tokens)[1]) == mask.sum()


def test_masked_tokens_get_no_gradient():
    hidden, head, targets, mask = inputs(seed=1)
    grad = jax.grad(lambda h: head_cross_entropy(h, head, targets, mask, 8)[0])(hidden)
    assert np.all(np.asarray(grad)[mask == 0] == 0)
    assert np.all(np.abs(np.asarray(grad)[mask == 1]).sum(axis=-1) > 0)


@pytest.mark.parametrize("chunk_tokens", [3, 9])
def test_prompt_heavy_rows_with_skipped_chunks_match_whole_logits(chunk_tokens):
    """Loss tokens only in a few places (a prompt-heavy batch, one row with none at all): the chunks that end up holding
    no loss token are skipped, and the loss and gradient still equal those of the whole logits."""
    hidden, head, targets, _ = inputs(seed=2)
    mask = np.zeros(targets.shape, np.int32)
    mask[0, 15:19] = 1  # a response at the end of the row
    mask[1, [2, 9, 20]] = 1  # scattered
    expected_loss, expected_grad = jax.value_and_grad(reference_loss)(hidden, head, targets, mask.astype(np.float32))
    value, grad = jax.jit(jax.value_and_grad(lambda h: head_cross_entropy(h, head, targets, mask, chunk_tokens)[0]))(
        hidden)
    np.testing.assert_allclose(value, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), atol=1e-6, rtol=1e-5)
    assert np.all(np.asarray(grad)[mask == 0] == 0)
