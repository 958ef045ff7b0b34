"""SLIM's weight yielding with sliding clustering (arXiv 2410.07739, section 3.3).

K cluster centres with a per-channel sigma model the downstream inputs. A token's out-of-domain score is
d = max over channels |x - c| / sigma - 1 at its nearest centre; routing then yields to the identity experts by
adding gamma * relu(d) to their logits [choice: the exact yielding function was not recovered]. In training each
centre and sigma slide toward the mean and spread of the tokens assigned to it [choice: exponential moving average].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nearest_cluster(x_btd: jax.Array, centres_kd: jax.Array) -> jax.Array:
    distance_btk = jnp.sum((x_btd[:, :, None, :] - centres_kd) ** 2, axis=-1)
    return jnp.argmin(distance_btk, axis=-1)


def out_of_domain_score(x_btd: jax.Array, centres_kd: jax.Array, sigma_kd: jax.Array) -> jax.Array:
    """d per token (batch, time) at the nearest centre."""
    index_bt = nearest_cluster(x_btd, centres_kd)
    z_btd = jnp.abs(x_btd - centres_kd[index_bt]) / sigma_kd[index_bt]
    return jnp.max(z_btd, axis=-1) - 1.0


def slide_clusters(x_btd: jax.Array, token_mask_bt: jax.Array, centres_kd: jax.Array, sigma_kd: jax.Array,
                   momentum: float) -> tuple[jax.Array, jax.Array]:
    """One sliding update: each centre with assigned real tokens moves toward their mean, its sigma toward their
    per-channel standard deviation around the new centre; centres with no tokens stay."""
    index_bt = nearest_cluster(x_btd, centres_kd)
    weight_btk = jax.nn.one_hot(index_bt, centres_kd.shape[0]) * token_mask_bt[..., None]
    count_k = jnp.sum(weight_btk, axis=(0, 1))
    safe_count_k1 = jnp.maximum(count_k, 1.0)[:, None]
    mean_kd = jnp.einsum("btk,btd->kd", weight_btk, x_btd) / safe_count_k1
    second_kd = jnp.einsum("btk,btd->kd", weight_btk, x_btd * x_btd) / safe_count_k1
    std_kd = jnp.sqrt(jnp.maximum(second_kd - mean_kd ** 2, 1e-6))
    has_tokens_k1 = (count_k > 0)[:, None]
    new_centres = jnp.where(has_tokens_k1, (1 - momentum) * centres_kd + momentum * mean_kd, centres_kd)
    new_sigma = jnp.where(has_tokens_k1, (1 - momentum) * sigma_kd + momentum * std_kd, sigma_kd)
    return new_centres, new_sigma
