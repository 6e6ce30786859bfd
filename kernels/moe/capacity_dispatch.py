"""Capacity-based (GShard-style) dispatch: each expert takes at most C assignments into a dense
[E, C, d] buffer; the rest are dropped.

Drop rule: within a group of tokens (the whole input, or each of G groups), assignments are
taken in *position order*, the flattened [N, k] routing read row-major (token 0's choices in rank
order, then token 1's, ...). An assignment's slot is the number of earlier assignments to the
same expert in its group; slot >= C drops it, and it contributes 0.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from .grouped import sort_by_expert
from .reference import ACC, ExpertWeights, check_routed, combine_rows, swiglu


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert: ceil(num_tokens * k / num_experts * factor)."""
    if num_tokens < 1 or k < 1 or num_experts < 1 or not factor > 0:
        raise ValueError(f"capacity needs positive sizes and factor, got num_tokens={num_tokens}, "
                         f"k={k}, num_experts={num_experts}, factor={factor}")
    return math.ceil(num_tokens * k / num_experts * factor)


def capacity_slots(expert_ids, num_experts: int, capacity: int):
    """(slot [N, k] int32, kept [N, k] bool): slot is the assignment's position within its
    expert in position order, kept = slot < capacity.

    Computed by a stable sort rather than a cumsum over an [N*k, E] one-hot: the sort keeps each
    expert's assignments in position order, so a position is its rank minus the expert's start."""
    if expert_ids.ndim != 2:
        raise ValueError(f"expert_ids must be [N, k], got {expert_ids.shape}")
    flat = expert_ids.reshape(-1)
    order, inverse, sizes = sort_by_expert(flat, num_experts)
    starts = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(flat.shape[0], dtype=jnp.int32)
    slot = (rank - starts[flat[order]])[inverse].reshape(expert_ids.shape)
    return slot, slot < capacity


def _identity(a):
    return a


def capacity_ffn(x, w: ExpertWeights, expert_ids, combine, capacity: int, *,
                 constrain_buffer: Callable[[jax.Array], jax.Array] = _identity):
    """Capacity-limited MoE: returns (y in x.dtype, kept bool [..., k]).

    x [N, d] is one group of tokens; x [G, N, d] is G groups (GShard's groups, e.g. one per
    sequence), each with its own `capacity` slots per expert and its own position order, with
    expert_ids and combine [G, N, k]. Grouping is what lets experts be sharded: the groups stay
    on the devices that hold their tokens while the [G, E, C, d] buffer's expert dimension is
    split over the expert devices, so the compiler moves the buffer with an all-to-all.

    The buffer is built by a gather (each slot reads its token's row; empty slots read zeros),
    every expert runs on its C rows per group with einsums over the stacked weights, and each
    kept assignment gathers its row back; dropped ones contribute 0. Memory is O(G*E*C*d), never
    the [N, k, E, C] one-hot of an einsum dispatch.

    constrain_buffer: applied to the [G, E, C, d] input buffer and to the expert output of the
    same shape (G = 1 for 2-D inputs), e.g. to pin E to the expert mesh axes so that GSPMD
    inserts the exchange between the token and expert layouts. Identity by default.
    """
    grouped = x.ndim == 3
    if not grouped:
        x, expert_ids, combine = x[None], expert_ids[None], combine[None]
    if x.ndim != 3 or expert_ids.ndim != 3 or combine.shape != expert_ids.shape:
        raise ValueError(f"capacity_ffn wants x [N, d] or [G, N, d] with expert_ids and combine "
                         f"[N, k] or [G, N, k]; got {x.shape}, {expert_ids.shape}, {combine.shape}")
    N, k, E, d = check_routed(x[0], w, expert_ids[0], combine[0])
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    slot, kept = jax.vmap(lambda ids: capacity_slots(ids, E, capacity))(expert_ids)
    # Flat buffer index of each assignment within its group; E*C (one past the end) for a
    # dropped one, which the scatter below drops and the final gather fills with zeros.
    dest = jnp.where(kept, expert_ids * capacity + slot, E * capacity)       # [G, N, k]
    token = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[:, None], (N, k)).reshape(-1)

    def fill(x_group, dest_group):
        # Token occupying each slot (N = none: the gather fills with 0). Slots are unique.
        source = jnp.full(E * capacity, N, jnp.int32).at[dest_group.reshape(-1)].set(
            token, mode="drop")
        return jnp.take(x_group, source, axis=0, mode="fill", fill_value=0)

    buffer = constrain_buffer(jax.vmap(fill)(x, dest).reshape(-1, E, capacity, d))
    h = swiglu(jnp.einsum("gecd,edf->gecf", buffer, w.gate, preferred_element_type=ACC),
               jnp.einsum("gecd,edf->gecf", buffer, w.up, preferred_element_type=ACC), x.dtype)
    out = jnp.einsum("gecf,efd->gecd", h, w.down, preferred_element_type=ACC).astype(x.dtype)
    out = constrain_buffer(out).reshape(-1, E * capacity, d)

    rows = jax.vmap(lambda o, dst: jnp.take(o, dst, axis=0, mode="fill", fill_value=0))(out, dest)
    y = jax.vmap(lambda c, r: combine_rows(c, r, x.dtype))(combine, rows)
    return (y, kept) if grouped else (y[0], kept[0])
