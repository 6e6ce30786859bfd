"""Capacity-based (GShard-style) dispatch: each expert takes at most C assignments into a dense
[E, C, d] buffer; the rest are dropped.

Drop rule: assignments are taken in *position order*, the flattened [N, k] routing read
row-major (token 0's choices in rank order, then token 1's, ...). An assignment's slot is the
number of earlier assignments to the same expert; slot >= C drops it, and it contributes 0.
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
    """Capacity-limited MoE: returns (y [N, d] in x.dtype, kept [N, k] bool).

    The [E, C, d] buffer is built by a gather (each slot reads its token's row; empty slots read
    zeros), every expert runs on its C rows with einsums over the stacked weights, and each kept
    assignment gathers its row back; dropped ones contribute 0. Memory is O(E*C*d), never the
    [N, k, E, C] one-hot of an einsum dispatch.

    constrain_buffer: applied to the [E, C, d] input buffer and to the [E, C, d] expert output,
    e.g. `lambda a: jax.lax.with_sharding_constraint(a, P("expert"))` so that GSPMD shards the
    experts and inserts the exchange between token and expert layouts. Identity by default.
    """
    N, k, E, d = check_routed(x, w, expert_ids, combine)
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    slot, kept = capacity_slots(expert_ids, E, capacity)
    # Flat buffer index of each assignment; E*C (one past the end) for a dropped one, which the
    # scatter below drops and the final gather fills with zeros.
    dest = jnp.where(kept, expert_ids * capacity + slot, E * capacity)
    token = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[:, None], (N, k))
    # Token occupying each slot (N = none: the gather fills with 0). Slots are unique.
    source = jnp.full(E * capacity, N, jnp.int32).at[dest.reshape(-1)].set(
        token.reshape(-1), mode="drop")
    buffer = jnp.take(x, source, axis=0, mode="fill", fill_value=0)
    buffer = constrain_buffer(buffer.reshape(E, capacity, d))

    h = swiglu(jnp.einsum("ecd,edf->ecf", buffer, w.gate, preferred_element_type=ACC),
               jnp.einsum("ecd,edf->ecf", buffer, w.up, preferred_element_type=ACC), x.dtype)
    out = jnp.einsum("ecf,efd->ecd", h, w.down, preferred_element_type=ACC).astype(x.dtype)
    out = constrain_buffer(out)

    rows = jnp.take(out.reshape(E * capacity, d), dest, axis=0, mode="fill", fill_value=0)
    return combine_rows(combine, rows, x.dtype), kept
