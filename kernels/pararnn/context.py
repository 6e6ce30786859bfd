"""The sequence split over mesh axes: the pieces of the Newton solve that cross block edges.

Called inside `shard_map`, each device holding one contiguous block of every sequence ([B, L/n,
...]; block i is positions i·L/n .. (i+1)·L/n − 1, in the order of the linear index of the axes).
Newton's method over the sequence needs three things from its neighbours, and nothing else:

* the state before the block's first step (the previous block's last state): `shift_in`;
* the linear recurrence of each Newton step and of the backward adjoint, δ_l = A_l δ_{l-1} + b_l,
  run across blocks: `scan`. It is linear in its incoming state, so each block scans from a zero
  state (local δ⁰, end e = δ⁰ at the block's far edge), computes the product P of its A's (an
  associative scan, which also gives the cumulative products C_l), and the n (P, e) pairs are
  all-gathered and folded in block order: s_in(0) = h0, s_in(j+1) = P_j s_in(j) + e_j. Then
  δ = δ⁰ + C ⊙ s_in. The same prefix-over-devices idea as GLA's state passing; the all-gather is
  n · (|P| + |e|) per call, tiny next to the activations;
* the adjoint's coefficient at the block's last step, A_{l+1}ᵀ, which belongs to the next block:
  `next_first`.

The plain sequential solve (impl "reference", a lax.scan of the nonlinear cell) cannot be split
that way; `relay` runs it n times, each block from the last state its predecessor had in the
round before, which is exact after n rounds (block j is right from round j on). Memory stays
O(L/n) per device; the work is n times one block, as much as one device scanning everything.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import scan as scan_lib


def _index(axis_name):
    return lax.axis_index(axis_name)


def _previous_block(x, axis_name, first):
    """The previous block's `x` on every block, `first` on block 0 (x [B, ...], per block)."""
    every = lax.all_gather(x, axis_name)                                     # [n, B, ...]
    i = _index(axis_name)
    return jnp.where(i > 0, every[jnp.maximum(i - 1, 0)], first)


def _next_block(x, axis_name, last):
    """The next block's `x` on every block, `last` on the final block."""
    every = lax.all_gather(x, axis_name)
    i, n = _index(axis_name), every.shape[0]
    return jnp.where(i < n - 1, every[jnp.minimum(i + 1, n - 1)], last)


def shift_in(h0, hs, axis_name):
    """The states each step reads, h_{l-1}: the previous block's last state before the first."""
    return scan_lib.shift_in(_previous_block(hs[:, -1], axis_name, h0), hs, False)


def next_first(a, axis_name):
    """[B, ...]: the next block's first coefficient A (zero on the final block)."""
    return _next_block(a[:, 0], axis_name, jnp.zeros_like(a[:, 0]))


def _cumulative_products(kind, a, reverse):
    """C_l = A_l ⋯ A_first: the product of the coefficients from the block's near edge to l."""
    if reverse:
        return jnp.flip(_cumulative_products(kind, jnp.flip(a, 1), False), 1)
    later_times_earlier = lambda earlier, later: scan_lib.matmul(kind, later, earlier)  # noqa: E731
    return lax.associative_scan(later_times_earlier, a, axis=1)


def scan(kind, a, b, h0, *, reverse, impl, axis_name):
    """`scan.scan_raw` on this block of a sequence split over `axis_name`; h0 is the state before
    the whole sequence (after it, with `reverse`), the same on every block."""
    local = scan_lib.scan_raw(kind, a, b, jnp.zeros_like(h0), reverse=reverse, impl=impl)
    cum = _cumulative_products(kind, a.astype(local.dtype), reverse)
    far = 0 if reverse else -1
    ends = lax.all_gather(local[:, far], axis_name)                          # [n, B, ...]
    products = lax.all_gather(cum[:, far], axis_name)
    n = ends.shape[0]
    incoming = [None] * n
    state = h0.astype(local.dtype)
    for j in (reversed(range(n)) if reverse else range(n)):                  # n is small, static
        incoming[j] = state
        state = scan_lib.matvec(kind, products[j], state) + ends[j]
    s_in = jnp.stack(incoming)[_index(axis_name)]
    return local + scan_lib.matvec(kind, cum, s_in[:, None])


def relay(solve_block, h0, axis_name):
    """Exact sequential solve across blocks: `solve_block(h_in) -> hs` run once per block count,
    each block starting from its predecessor's last state of the round before."""
    n = lax.all_gather(jnp.zeros((), jnp.int32), axis_name).shape[0]

    def one_round(_, carry):
        hs = solve_block(carry[0])
        return _previous_block(hs[:, -1], axis_name, h0), hs

    hs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(solve_block, h0))
    return lax.fori_loop(0, n, one_round, (h0, hs))[1]
