"""Context parallelism for GLA: the sequence split over mesh axes, states passed between shards.

Called inside `shard_map` with each device holding one contiguous block of the sequence
([B, T/n, H, *]; block i is positions i·T/n .. (i+1)·T/n − 1). The recurrence is linear in its
state, so a block's output is its output from a zero state plus the contribution of the state it
receives:

  1. each block runs `chunk_gla` from a zero state: o⁰, and its end state S⁰ (all its keys);
  2. each block's transfer D = exp(Σ g) [B, H, K] over the block (0 when a document starts in it);
  3. the n end states and transfers are all-gathered (n · [B, H, K, V] floats per call, tiny next
     to the activations) and folded in block order, S_in(0) = initial_state,
     S_in(j+1) = D_j ⊙ S_in(j) + S⁰_j, so every block knows the state entering it and the final
     state S_in(n);
  4. o = o⁰ + s (Q ⊙ e^{G}) S_in, G the cumulative log decay from the block start, for the rows
     before the block's first document start (later rows do not see the incoming state).

Gradients come from autodiff of these steps (the all-gather's transpose is a reduce-scatter);
`chunk_gla`'s own custom VJP handles step 1. The cumulative decay of step 4 runs over the whole
block, in the accumulation dtype, as an associative scan (XLA:CPU lowers `cumsum` to a quadratic
reduce-window); its rounding only touches rows whose incoming-state weight e^{G} is still large,
where |G| is small.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .api import chunk_gla
from .reference import acc_dtype

_HI = jax.lax.Precision.HIGHEST


def _cumsum(x, axis):
    return jax.lax.associative_scan(jnp.add, x, axis=axis)


def _starts(segment_ids, axis_name):
    """[B, T/n] bool: a document starts at this row, counting a change across the block boundary
    (the previous block's last id comes from an all-gather; block 0 starts with no reset)."""
    last = jax.lax.all_gather(segment_ids[:, -1], axis_name)                  # [n, B]
    i = jax.lax.axis_index(axis_name)
    before = jnp.where(i > 0, last[jnp.maximum(i - 1, 0)], segment_ids[:, 0])
    prev = jnp.concatenate([before[:, None], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


def sequence_sharded_gla(q, k, v, g, *, axis_name, scale=None, initial_state=None,
                         output_final_state=False, segment_ids=None, chunk_size=64,
                         impl="auto"):
    """`chunk_gla` on this device's block of a sequence split over `axis_name` (inside
    `shard_map`). Same arguments and results as `chunk_gla`, on the local [B, T/n, H, *] blocks;
    `initial_state` (the state before the whole sequence) and `final_state` (after it) are the
    same on every device."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    acc = acc_dtype(q.dtype)
    o, end = chunk_gla(q, k, v, g, scale=scale, output_final_state=True, segment_ids=segment_ids,
                       chunk_size=chunk_size, impl=impl)
    G = _cumsum(g.astype(acc), axis=1)                                       # [B, T/n, H, K]
    decay = jnp.exp(G[:, -1])                                                 # [B, H, K]
    sees_incoming = jnp.ones((B, T), bool)
    if segment_ids is not None:
        sees_incoming = _cumsum(_starts(segment_ids, axis_name).astype(jnp.int32), axis=1) == 0
        decay = decay * sees_incoming[:, -1, None, None]
    ends = jax.lax.all_gather(end, axis_name)                                # [n, B, H, K, V]
    decays = jax.lax.all_gather(decay, axis_name)                            # [n, B, H, K]
    state = (jnp.zeros_like(end) if initial_state is None else initial_state.astype(acc))
    incoming = []
    for j in range(ends.shape[0]):                                           # n is small, static
        incoming.append(state)
        state = decays[j][..., None] * state + ends[j]
    s_in = jnp.stack(incoming)[jax.lax.axis_index(axis_name)]                # [B, H, K, V]
    qe = jnp.where(sees_incoming[:, :, None, None], q.astype(acc) * jnp.exp(G), 0.0)
    o = o.astype(acc) + scale * jnp.einsum("bthk,bhkv->bthv", qe, s_in, precision=_HI)
    return o.astype(q.dtype), (state if output_final_state else None)
