"""Chunked GLA driver shared by the XLA and Pallas paths.

Work is split the sequence-parallel way (KERNELS.md §1, "Materialisation"):

  1. per chunk n, in parallel:   U_n = (K ⊙ exp(γ_n − G))ᵀ V            (`ops.fwd_state`)
  2. a short scan over chunks:   S_{n+1} = diag(exp γ_n) S_n + U_n       (here, in XLA)
  3. per chunk n, in parallel:   O_n = s (Q ⊙ e^G) S_n + A_n V_n          (`ops.fwd_out`)

The backward recomputes U (and the chunk-start states) instead of storing per-step states, runs the
reverse scan dS_n = diag(exp γ_n) dS_{n+1} + W_n, then one parallel pass for dq, dk, dv
(`ops.bwd_grads`); dg is the closed form "reverse cumsum of q⊙dq − k⊙dk inside the chunk plus
rowsum(S_{n+1} ⊙ dS_{n+1})", which needs no extra kernel.

Only step 1/3-style chunk-local work lives in `ops`, so the XLA (vectorised einsums) and Pallas
(one grid point per chunk) paths share this file: layout, padding, segments, scans and custom_vjp.

Segments: `seg` is [B, N, C] float, the number of document starts since the end of the previous
chunk (0 = same document as the chunk-start state). Row r sees key j iff seg[r] == seg[j]; row r
sees the chunk-start state iff seg[r] == 0; key j reaches S_{n+1} iff seg[j] == seg[C-1]; S_n
survives into S_{n+1} iff seg[C-1] == 0. Padded rows (k = v = q = g = 0) change nothing.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .reference import acc_dtype, resets_from_segments


class ChunkOps(NamedTuple):
    """Chunk-local primitives; arrays are [B, H, N, C, *], seg [B, N, C] or None."""
    fwd_state: callable   # (k, v, G, seg) -> U [B,H,N,K,V]
    fwd_out: callable     # (q, k, v, G, seg, S) -> O [B,H,N,C,V]
    bwd_prep: callable    # (q, k, v, G, seg, dO) -> (U, W)
    bwd_grads: callable   # (q, k, v, G, seg, dO, S, dS_next) -> (dq, dk, dv)


# ----------------------------------------------------------------------------- layout

def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, H, D] -> [B, H, N, C, D], zero-padding T up to a multiple of C."""
    B, T, H, D = x.shape
    n = -(-T // chunk)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0)))
    return x.reshape(B, n, chunk, H, D).transpose(0, 3, 1, 2, 4)


def from_chunks(x: jax.Array, T: int) -> jax.Array:
    """[B, H, N, C, D] -> [B, T, H, D] (drops padding)."""
    B, H, N, C, D = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, N * C, H, D)[:, :T]


def segment_offsets(segment_ids: jax.Array, chunk: int) -> jax.Array:
    """[B, T] ids -> [B, N, C] float: document starts since the previous chunk's last row.

    Padding repeats the last id so no reset is added after T. Float because kernels compare
    it with masks; counts ≤ C are exact in any float type.
    """
    B, T = segment_ids.shape
    n = -(-T // chunk)
    count = jnp.cumsum(resets_from_segments(segment_ids).astype(jnp.int32), axis=1)
    count = jnp.pad(count, ((0, 0), (0, n * chunk - T)), mode="edge").reshape(B, n, chunk)
    prev = jnp.concatenate([count[:, :1, :1], count[:, :-1, -1:]], axis=1)   # row before chunk
    return (count - prev).astype(jnp.float32)


def chunk_decay(G: jax.Array, seg) -> jax.Array:
    """exp(γ_n) with γ_n = G at the chunk's last row, zeroed when a document starts inside."""
    decay = jnp.exp(G[..., -1, :])
    if seg is not None:
        decay = decay * (seg[:, None, :, -1:] == 0).astype(decay.dtype)
    return decay


# ----------------------------------------------------------------------------- scans

def forward_states(h0, decay, U):
    """All chunk-boundary states S_0..S_N, [B, H, N+1, K, V]; S_0 = h0."""
    def step(s, xs):
        d, u = xs
        s_next = d[..., :, None] * s + u
        return s_next, s_next
    _, rest = jax.lax.scan(step, h0, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(U, 2, 0)))
    return jnp.concatenate([h0[:, :, None], jnp.moveaxis(rest, 0, 2)], axis=2)


def backward_states(dST, decay, W):
    """dS_0..dS_N with dS_N = dS_T and dS_n = diag(exp γ_n) dS_{n+1} + W_n."""
    def step(ds, xs):
        d, w = xs
        ds_prev = d[..., :, None] * ds + w
        return ds_prev, ds_prev
    _, rest = jax.lax.scan(step, dST, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(W, 2, 0)),
                           reverse=True)
    return jnp.concatenate([jnp.moveaxis(rest, 0, 2), dST[:, :, None]], axis=2)


def chunk_cumsum(x: jax.Array, reverse: bool = False) -> jax.Array:
    """Cumulative sum over the chunk axis (-2) as a triangular matmul: XLA:CPU lowers cumsum to a
    quadratic reduce-window (slow), and an unrolled running sum costs seconds of compile time."""
    C = x.shape[-2]
    tri = np.tril(np.ones((C, C))) if not reverse else np.triu(np.ones((C, C)))
    return jnp.einsum("rc,...ck->...rk", jnp.asarray(tri, x.dtype), x,
                      precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_core(ops, q, k, v, g, h0, seg):
    return _core_fwd(ops, q, k, v, g, h0, seg)[0]


def _core_fwd(ops, q, k, v, g, h0, seg):
    G = chunk_cumsum(g.astype(h0.dtype))                 # chunk-local cumulative log decay
    decay = chunk_decay(G, seg)
    U = ops.fwd_state(k, v, G, seg)
    S = forward_states(h0, decay, U)
    o = ops.fwd_out(q, k, v, G, seg, S[:, :, :-1])
    return (o, S[:, :, -1]), (q, k, v, g, h0, seg)


def _core_bwd(ops, res, cts):
    q, k, v, g, h0, seg = res
    do, dST = cts
    acc = h0.dtype
    G = chunk_cumsum(g.astype(acc))
    decay = chunk_decay(G, seg)
    U, W = ops.bwd_prep(q, k, v, G, seg, do)
    S = forward_states(h0, decay, U)                     # recomputed, one state per chunk
    dS = backward_states(dST.astype(acc), decay, W)
    dq, dk, dv = ops.bwd_grads(q, k, v, G, seg, do, S[:, :, :-1], dS[:, :, 1:])
    # closed-form gate gradient, chunk-locally (no long cumsum -> no fp32 cancellation over T)
    local = q.astype(acc) * dq - k.astype(acc) * dk
    dg = chunk_cumsum(local, reverse=True) + jnp.sum(S[:, :, 1:] * dS[:, :, 1:], -1)[..., None, :]
    dseg = None if seg is None else jnp.zeros_like(seg)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
            dS[:, :, 0].astype(h0.dtype), dseg)


_chunked_core.defvjp(_core_fwd, _core_bwd)
# jit boundary around the core: eager callers compile it once per chunked shape (so T = 1..64 share
# one executable), and under an outer jit it is inlined as usual.
_chunked_core_jit = jax.jit(_chunked_core, static_argnums=(0,))


def chunked_gla(ops: ChunkOps, q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    """Validated [B, T, H, *] inputs -> (o [B, T, H, V] in q.dtype, final state [B, H, K, V])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = acc_dtype(q.dtype)
    h0 = (jnp.zeros((B, H, K, V), acc) if initial_state is None
          else initial_state.astype(acc))
    seg = None if segment_ids is None else segment_offsets(segment_ids, chunk_size)
    q, k, v, g = (to_chunks(x, chunk_size) for x in (q, k, v, g))
    o, final = _chunked_core_jit(ops, q, k, v, g, h0, seg)
    return from_chunks(o, T).astype(q.dtype), final
