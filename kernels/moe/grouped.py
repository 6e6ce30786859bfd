"""Grouped matmul (tiled XLA / ragged_dot / megablox) and the single-device dropless MoE built
on it.

`grouped_matmul(lhs [m, k], rhs [g, k, n], group_sizes [g])`: rows are consecutive groups,
group i of size group_sizes[i] is multiplied by rhs[i]; rows past sum(group_sizes) come out zero.

impl:
* "xla": tiles in plain XLA: each group's rows are padded to whole tiles of `XLA_TILE` rows and a
  `lax.map` over the tiles multiplies each by its group's matrix, so the work is the rows actually
  routed (plus at most one partial tile per group), on every platform;
* "ragged_dot": `jax.lax.ragged_dot`. A native grouped matmul where the backend has one; XLA:CPU
  lowers it to a masked dense product over every group (g times the FLOPs and memory);
* "pallas": the megablox kernel shipped with JAX (`jax.experimental.pallas.ops.tpu.megablox`,
  its custom-VJP `ops.gmm`), compiled by Mosaic when the program is lowered for TPU and run in
  Pallas interpret mode on any other platform (slow; for tests);
* "auto": "pallas" when lowered for TPU, "ragged_dot" for GPUs, "xla" elsewhere (chosen at
  lowering time, `platform.by_lowering_platform`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from ..platform import by_lowering_platform
from .reference import ACC, ExpertWeights, check_routed, combine_rows, swiglu

GMM_IMPLS = ("auto", "xla", "ragged_dot", "pallas")
# Rows per tile of the "xla" path: large enough for an efficient matmul per tile, small enough
# that padding each group to whole tiles adds little.
XLA_TILE = 128
# Megablox's largest tile per dimension; 128 is the TPU lane width, so any d, f that are
# multiples of 128 tile exactly in the forward and in the transposed backward matmuls.
MAX_TILE = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def sort_by_expert(flat_ids, num_groups: int):
    """Stable sort of assignments by group.

    flat_ids [M] int in [0, num_groups] (num_groups itself marks padding, sorted last and
    not counted) -> (order [M]: sorted position -> original position, inverse [M]: original
    position -> sorted position, group_sizes [num_groups] int32). Stability keeps equal ids in
    their original order, which the capacity rule relies on."""
    order = jnp.argsort(flat_ids, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    sizes = jnp.zeros(num_groups, jnp.int32).at[flat_ids].add(1, mode="drop")
    return order, inverse, sizes


def default_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Megablox tiles (tm, tk, tn) for a problem; rows are padded to a multiple of tm.

    tm = 128, or all rows (rounded up to 16, bf16's sublane tile) when there are fewer: a row
    tile that is neither a multiple of 128 nor the whole dimension would break the backward
    `tgmm`, which puts rows on the lane axis. tk, tn = 128 (clipped to the dimension for tiny
    interpreted problems; on TPU d and f should be multiples of 128)."""
    return min(MAX_TILE, _round_up(m, 16)), min(MAX_TILE, k), min(MAX_TILE, n)


def _megablox(lhs, rhs, group_sizes, *, tiling, interpret: bool, out_dtype):
    m, k = lhs.shape
    tm, tk, tn = tiling or default_tiling(m, k, rhs.shape[2])
    padded = _round_up(m, tm)            # megablox wants m divisible by the row tile
    lhs = jnp.pad(lhs, ((0, padded - m), (0, 0)))
    # Positional: ops.gmm is a custom_vjp whose non-differentiable arguments are positions
    # (preferred_element_type, tiling, transpose_rhs, interpret).
    out = megablox.gmm(lhs, rhs, group_sizes, out_dtype, (tm, tk, tn), None, None, False,
                       interpret)
    return out[:m]


def _tiled(lhs, rhs, group_sizes, *, out_dtype):
    """The "xla" grouped matmul: groups padded to whole tiles, one matmul per tile."""
    m, g = lhs.shape[0], rhs.shape[0]
    tile = min(XLA_TILE, _round_up(m, 8))
    num_tiles = -(-m // tile) + g           # every group may end in a partial tile
    padded = -(-group_sizes // tile) * tile
    padded_ends = jnp.cumsum(padded)
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(m)
    group = jnp.searchsorted(ends, row, side="right")          # g for rows past the last group
    in_group = group < g
    safe = jnp.minimum(group, g - 1)
    dest = jnp.where(in_group, padded_ends[safe] - padded[safe] + row - (ends[safe] - group_sizes[safe]),
                     num_tiles * tile)                          # one past the end: dropped
    tiles = jnp.zeros((num_tiles * tile, lhs.shape[1]), lhs.dtype).at[dest].set(lhs, mode="drop")
    # A tile past every group computes garbage-free zeros: its rows are zero and none reads it.
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile,
                                              side="right"), g - 1)

    def one(args):
        rows, index = args
        return jnp.dot(rows, rhs[index], preferred_element_type=out_dtype)

    out = jax.lax.map(one, (tiles.reshape(num_tiles, tile, -1), tile_group))
    return jnp.take(out.reshape(num_tiles * tile, -1), dest, axis=0, mode="fill", fill_value=0)


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto", preferred_element_type=ACC,
                   tiling: tuple[int, int, int] | None = None, interpret: bool | None = None):
    """out[r] = lhs[r] @ rhs[group of r]; lhs [m, k], rhs [g, k, n], group_sizes [g] int with
    sum <= m. Returns [m, n] in preferred_element_type (float32 accumulation); rows past the
    last group are zero, and their lhs rows get zero gradient (whatever they hold).

    impl: "auto" | "xla" | "ragged_dot" | "pallas" (module docstring). tiling (pallas only): megablox tiles
    (tm, tk, tn), default `default_tiling`. interpret (pallas only): None = Mosaic when lowered
    for TPU and interpret mode elsewhere; True/False force it.
    """
    if impl not in GMM_IMPLS:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; expected one of {GMM_IMPLS}")
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"grouped_matmul needs lhs [m, k] and rhs [g, k, n]: lhs {lhs.shape}, "
                         f"rhs {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must be [g={rhs.shape[0]}], got {group_sizes.shape}")
    group_sizes = group_sizes.astype(jnp.int32)
    # Rows past the last group are masked on both sides: megablox leaves those output rows (and
    # the same rows of its lhs gradient) uninitialised -- NaN in interpret mode -- and a
    # select, unlike a product with a 0/1 mask, does not pass NaN through.
    valid = (jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes))[:, None]
    lhs = jnp.where(valid, lhs, jnp.zeros((), lhs.dtype))

    def run(choice):
        if choice == "xla":
            return _tiled(lhs, rhs, group_sizes, out_dtype=preferred_element_type)
        if choice == "ragged_dot":
            return jax.lax.ragged_dot(lhs, rhs, group_sizes,
                                      preferred_element_type=preferred_element_type)
        return _megablox(lhs, rhs, group_sizes, tiling=tiling, interpret=choice == "interpret",
                         out_dtype=preferred_element_type)

    if impl in ("xla", "ragged_dot"):
        out = run(impl)
    elif impl == "pallas" and interpret is not None:
        out = run("interpret" if interpret else "mosaic")
    elif impl == "pallas":
        out = by_lowering_platform(run, {"tpu": "mosaic"}, "interpret")
    else:
        out = by_lowering_platform(run, {"tpu": "mosaic", "cuda": "ragged_dot",
                                         "rocm": "ragged_dot"}, "xla")
    return jnp.where(valid, out, jnp.zeros((), out.dtype))


def grouped_swiglu(rows, group_sizes, w: ExpertWeights, *, impl: str = "auto"):
    """SwiGLU experts on rows sorted by expert: three grouped matmuls (gate, up, down).

    rows [m, d] (group i = expert i's rows, padding after the last group), group_sizes [E] ->
    [m, d] float32 down-projection output (a partial sum when f is split: the caller reduces,
    then rounds). Padding rows come out zero."""
    gmm = functools.partial(grouped_matmul, group_sizes=group_sizes, impl=impl)
    h = swiglu(gmm(rows, w.gate), gmm(rows, w.up), rows.dtype)
    return gmm(h, w.down)


def dropless_ffn(x, w: ExpertWeights, expert_ids, combine, *, impl: str = "auto"):
    """Dropless MoE on one device: every one of the N*k assignments is computed.

    Sorts the assignments by expert (stable), gathers their rows, runs the experts as grouped
    matmuls, unsorts and combines. x [N, d], expert_ids [N, k] in [0, E), combine [N, k] ->
    y [N, d] in x.dtype. impl: the grouped matmul's (`GMM_IMPLS`)."""
    N, k, E, _ = check_routed(x, w, expert_ids, combine)
    order, inverse, sizes = sort_by_expert(expert_ids.reshape(-1), E)
    out = grouped_swiglu(x[order // k], sizes, w, impl=impl).astype(x.dtype)
    return combine_rows(combine, out[inverse].reshape(N, k, -1), x.dtype)
