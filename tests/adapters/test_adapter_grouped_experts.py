"""Expert-grouped products (the top-k slots of MixLoRA/SLIM) equal the plain per-token product x_t F_{e_t}, with zeros
for tokens that use no LoRA expert, in value and gradient, whatever the routing (balanced, all on one expert, experts
left empty), the tile size and the number of batch groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoelora.adapters.grouped_experts import (group_tokens, tile_products, tile_size_for, to_sorted_rows,
                                                 to_token_rows)

E, D_IN, D_OUT = 4, 6, 5


def reference_products(x_nd, expert_n, factor_edf):
    """Per token, literally: x_t @ F_{e_t}, or zeros when e_t < 0."""
    out = np.zeros((x_nd.shape[0], factor_edf.shape[-1]))
    for t, e in enumerate(expert_n):
        if e >= 0:
            out[t] = x_nd[t] @ factor_edf[e]
    return out


def grouped_products(x_gnd, expert_gn, factor_edf, tile):
    grouping = group_tokens(expert_gn, E, tile)
    return to_token_rows(tile_products(to_sorted_rows(x_gnd, grouping), factor_edf, grouping), grouping)


ROUTINGS = {
    "balanced": lambda rng, n: rng.integers(0, E, n),
    "one expert": lambda rng, n: np.full(n, 2),
    "some unused and some tokens without an expert": lambda rng, n: rng.choice([-1, 0, 3], n),
    "no token uses an expert": lambda rng, n: np.full(n, -1),
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("groups,tokens,tile", [(1, 37, 8), (3, 20, 8), (2, 64, 16)])
def test_grouped_products_and_gradients_equal_the_per_token_product(routing, groups, tokens, tile):
    rng = np.random.default_rng(0)
    x_gnd = rng.standard_normal((groups, tokens, D_IN)).astype(np.float32)
    expert_gn = np.stack([ROUTINGS[routing](rng, tokens) for _ in range(groups)]).astype(np.int32)
    factor_edf = rng.standard_normal((E, D_IN, D_OUT)).astype(np.float32)
    cotangent_gnf = rng.standard_normal((groups, tokens, D_OUT)).astype(np.float32)

    got = grouped_products(jnp.asarray(x_gnd), jnp.asarray(expert_gn), jnp.asarray(factor_edf), tile)
    expected = np.stack([reference_products(x_gnd[g], expert_gn[g], factor_edf) for g in range(groups)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    def loss(x, factor, fn):
        return jnp.sum(fn(x, factor) * cotangent_gnf)

    grouped = lambda x, f: grouped_products(x, jnp.asarray(expert_gn), f, tile)  # noqa: E731
    # The dense reference: every expert's product, kept by a one-hot of the token's expert.
    onehot_gne = jax.nn.one_hot(expert_gn, E)
    dense = lambda x, f: jnp.einsum("gne,gnd,edf->gnf", onehot_gne, x, f)  # noqa: E731
    got_grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x_gnd), jnp.asarray(factor_edf), grouped)
    expected_grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x_gnd), jnp.asarray(factor_edf), dense)
    for g, e in zip(got_grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    if routing == "balanced":
        assert float(jnp.max(jnp.abs(got_grads[1]))) > 0


def test_each_tile_holds_one_expert_and_every_used_token_one_row():
    rng = np.random.default_rng(1)
    expert_gn = jnp.asarray(rng.choice([-1, 0, 1, 3], (2, 50)), jnp.int32)
    grouping = group_tokens(expert_gn, E, 8)
    sorted_from_gl = np.asarray(grouping.sorted_from_gl)
    rows = sorted_from_gl.shape[1]
    assert rows % 8 == 0
    tile_experts_gte = np.asarray(grouping.tile_experts_gte)
    for g in range(2):
        experts = np.asarray(expert_gn[g])
        held = sorted_from_gl[g][sorted_from_gl[g] < 50]
        assert sorted(held) == sorted(np.flatnonzero(experts >= 0))  # each used token once, unused tokens nowhere
        for tile_index in range(rows // 8):
            tokens = sorted_from_gl[g, tile_index * 8:(tile_index + 1) * 8]
            tokens = tokens[tokens < 50]
            if len(tokens):
                assert len(set(experts[tokens])) == 1
                assert tile_experts_gte[g, tile_index].argmax() == experts[tokens[0]]
                assert tile_experts_gte[g, tile_index].sum() == 1


def test_tile_size_is_a_power_of_two_within_bounds():
    assert tile_size_for(2048, 8) == 64
    assert tile_size_for(16, 8) == 8
    assert tile_size_for(10 ** 6, 8) == 128
