"""Expert-grouped low-rank products for top-k slots: each token's row goes to a tile of rows that all picked the same
expert, so a slot's product with its expert's factor contracts over the rank r instead of over E * r (a one-hot over
all experts costs E times the multiply-adds).

Tokens are grouped within `groups` equal slices of the batch, never across them: with `groups` a multiple of the
number of shards the batch is split into, each group lies on one device and the sort, the row moves and the tile
products stay local under data parallelism.

    rows      = tokens sorted by expert, each expert's run padded to a multiple of the tile size
    y_tokens  = unsort( tile_e(rows) @ F_e )                       (F = B of gate/up, or A of down)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertGrouping(NamedTuple):
    """Where each token's row sits among the sorted rows of its group, and back.

    sorted_from_gl:   for each sorted row, the token it holds (num_tokens for a padding row)
    token_to_gn:      for each token, its sorted row (num_rows for a token that picked no LoRA expert)
    tile_experts_gte: one-hot of each tile's expert (all zeros for an empty tile)
    """
    sorted_from_gl: jax.Array
    token_to_gn: jax.Array
    tile_experts_gte: jax.Array
    tile_size: int


def tile_size_for(tokens: int, num_experts: int) -> int:
    """A power of two near tokens / (4 E), within [8, 128]: padding stays under a quarter of the rows on balanced
    routing while each tile's product is still a whole matmul."""
    target = max(tokens // (4 * num_experts), 1)
    return int(min(128, max(8, 2 ** math.floor(math.log2(target)))))


def batch_groups(batch: int) -> int:
    """Groups of rows that each lie on one device whatever the batch sharding of a mesh over all devices:
    gcd(batch, device count), since such a batch is split into a number of shards that divides both. (With a mesh
    over fewer devices the results are the same; the sort may then cross devices.)"""
    return math.gcd(batch, jax.device_count())


def group_tokens(expert_gn: jax.Array, num_experts: int, tile_size: int) -> ExpertGrouping:
    """The grouping of each group's tokens by `expert_gn` (int, -1 for a token that uses no LoRA expert)."""
    g, n = expert_gn.shape
    num_rows = _num_rows(n, num_experts, tile_size)
    sorted_from, token_to, tile_experts = jax.vmap(
        lambda e: _group_one(e, num_experts, tile_size, num_rows))(expert_gn)
    return ExpertGrouping(sorted_from, token_to, tile_experts, tile_size)


def _num_rows(tokens: int, num_experts: int, tile: int) -> int:
    return -(-(tokens + num_experts * (tile - 1)) // tile) * tile


def _group_one(expert_n, num_experts, tile, num_rows):
    n = expert_n.shape[0]
    bucket_n = jnp.where(expert_n >= 0, expert_n, num_experts)  # tokens without a LoRA expert sort last, unused
    counts_e = jnp.zeros(num_experts + 1, jnp.int32).at[bucket_n].add(1)[:num_experts]
    padded_e = -(-counts_e // tile) * tile
    padded_end_e = jnp.cumsum(padded_e)
    padded_start_e = padded_end_e - padded_e
    start_e = jnp.cumsum(counts_e) - counts_e
    order_n = jnp.argsort(bucket_n, stable=True)
    bucket_sorted_n = bucket_n[order_n]
    used_n = bucket_sorted_n < num_experts
    clipped_n = jnp.minimum(bucket_sorted_n, num_experts - 1)
    row_sorted_n = padded_start_e[clipped_n] + jnp.arange(n) - start_e[clipped_n]
    row_sorted_n = jnp.where(used_n, row_sorted_n, num_rows)
    token_to_n = jnp.zeros(n, jnp.int32).at[order_n].set(row_sorted_n.astype(jnp.int32))
    sorted_from_l = jnp.full(num_rows + 1, n, jnp.int32).at[token_to_n].set(jnp.arange(n, dtype=jnp.int32))
    tile_start_t = jnp.arange(0, num_rows, tile)
    tile_expert_t = jnp.searchsorted(padded_end_e, tile_start_t, side="right")
    tile_experts_te = jax.nn.one_hot(tile_expert_t, num_experts, dtype=jnp.float32)  # index E (empty) -> zeros
    return sorted_from_l[:num_rows], token_to_n, tile_experts_te


def _take_rows(x_gm_: jax.Array, index_gk: jax.Array) -> jax.Array:
    """x[index] per group, with index == len(x) reading a zero row."""
    take = lambda x, i: jnp.take(x, i, axis=0, mode="fill", fill_value=0)  # noqa: E731
    if x_gm_.shape[0] == 1:  # a plain row gather: several times faster on XLA:CPU than the batched form
        return take(x_gm_[0], index_gk[0])[None]
    return jax.vmap(take)(x_gm_, index_gk)


@jax.custom_vjp
def move_rows(x_gm_: jax.Array, index_gk: jax.Array, inverse_gm: jax.Array) -> jax.Array:
    """Rows of x to the places `index` names (a zero row for index == len(x)). Every row of x lands in at most one
    place, at `inverse`, so the gradient is the same kind of move back rather than a scatter-add."""
    return _take_rows(x_gm_, index_gk)


def _move_rows_fwd(x_gm_, index_gk, inverse_gm):
    return _take_rows(x_gm_, index_gk), (index_gk, inverse_gm)


def _move_rows_bwd(residuals, g_gk_):
    index_gk, inverse_gm = residuals
    return _take_rows(g_gk_, inverse_gm), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def to_sorted_rows(x_gn_: jax.Array, grouping: ExpertGrouping) -> jax.Array:
    """Token rows (groups, tokens, ...) -> sorted rows (groups, rows, ...), zeros in padding rows."""
    return move_rows(x_gn_, grouping.sorted_from_gl, grouping.token_to_gn)


def to_token_rows(y_gl_: jax.Array, grouping: ExpertGrouping) -> jax.Array:
    """Sorted rows -> token rows; a token that uses no LoRA expert gets zeros."""
    return move_rows(y_gl_, grouping.token_to_gn, grouping.sorted_from_gl)


def tile_products(rows_glx: jax.Array, factor_exy: jax.Array, grouping: ExpertGrouping) -> jax.Array:
    """Each sorted row times its tile's expert factor: (groups, rows, x) x (experts, x, y) -> (groups, rows, y)."""
    return _tile_products(rows_glx, factor_exy, grouping.tile_experts_gte, grouping.tile_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tile_products(rows_glx, factor_exy, tile_experts_gte, tile):
    return _tile_products_fwd(rows_glx, factor_exy, tile_experts_gte, tile)[0]


def _tile_factors(factor_exy, tile_experts_gte):
    return jnp.einsum("gte,exy->gtxy", tile_experts_gte.astype(factor_exy.dtype), factor_exy)


def _tiled(rows_gl_, tile):
    g, rows = rows_gl_.shape[:2]
    return rows_gl_.reshape(g, rows // tile, tile, *rows_gl_.shape[2:])


def _tile_products_fwd(rows_glx, factor_exy, tile_experts_gte, tile):
    out_gtsy = jnp.einsum("gtsx,gtxy->gtsy", _tiled(rows_glx, tile), _tile_factors(factor_exy, tile_experts_gte))
    return out_gtsy.reshape(*rows_glx.shape[:2], factor_exy.shape[-1]), (rows_glx, factor_exy, tile_experts_gte)


def _tile_products_bwd(tile, residuals, g_gly):
    rows_glx, factor_exy, tile_experts_gte = residuals
    rows_gtsx, g_gtsy = _tiled(rows_glx, tile), _tiled(g_gly, tile)
    tiles_gte = tile_experts_gte.astype(g_gly.dtype)
    # XLA:CPU gives a batched matmul its fast kernel only when the left operand contracts over its last axis and the
    # right one over its first non-batch axis; each product below is written so, transposing only rank-wide arrays.
    # The factor's gradient is summed from the tiles back onto their experts by the transposed one-hot product.
    if rows_glx.shape[-1] <= factor_exy.shape[-1]:  # rows of rank width: a B factor
        g_tiles_gtxy = jnp.einsum("gtxs,gtsy->gtxy", jnp.swapaxes(rows_gtsx, 2, 3), g_gtsy)
        g_factor_exy = jnp.einsum("gte,gtxy->exy", tiles_gte, g_tiles_gtxy)
    else:  # an A factor: the rank-wide operand is the gradient
        g_tiles_gtyx = jnp.einsum("gtys,gtsx->gtyx", jnp.swapaxes(g_gtsy, 2, 3), rows_gtsx)
        g_factor_exy = jnp.swapaxes(jnp.einsum("gte,gtyx->eyx", tiles_gte, g_tiles_gtyx), 1, 2)
    factor_t_gtyx = _tile_factors(jnp.swapaxes(factor_exy, 1, 2), tile_experts_gte)
    g_rows_gtsx = jnp.einsum("gtsy,gtyx->gtsx", g_gtsy, factor_t_gtyx)
    return g_rows_gtsx.reshape(rows_glx.shape), g_factor_exy.astype(factor_exy.dtype), jnp.zeros_like(tile_experts_gte)


_tile_products.defvjp(_tile_products_fwd, _tile_products_bwd)
