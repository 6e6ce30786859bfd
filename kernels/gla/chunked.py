"""Chunked GLA driver shared by the XLA and Pallas paths.

Work is split the sequence-parallel way (docs/gla.md, "Chunked form"):

  1. per chunk n, in parallel:   U_n = (K ⊙ exp(γ_n − G))ᵀ V            (`ops.fwd_state`)
  2. a short scan over chunks:   S_{n+1} = diag(exp γ_n) S_n + U_n       (here, in XLA)
  3. per chunk n, in parallel:   O_n = s (Q ⊙ e^G) S_n + A_n V_n          (`ops.fwd_out`)

The backward recomputes U (and the chunk-start states) instead of storing per-step states, runs the
reverse scan dS_n = diag(exp γ_n) dS_{n+1} + W_n, then one parallel pass for dq, dk, dv
(`ops.bwd_grads`); dg is the closed form of docs/gla.md ("Backward and the gate gradient")
evaluated chunk-locally, arranged so that nothing large cancels (see `_bwd_body`); it needs no
extra kernel.

The log decay reaches `ops` as L, the cumulative sum of g *within each sub-chunk* of `sub` rows,
not as the chunk-cumulative G = (sums of the earlier sub-chunks) + L. Every exponent is a
difference G_r − G_j, and in fp32 a difference of two large cumulative sums (|G| reaches ~450 at a
chunk's end under strong gates) loses exactly the digits that matter: the pairs of nearby rows,
whose weights dominate the gate gradient, come out ~3e-5 off in the exponent. From L, the
difference of rows in one sub-chunk is L_r − L_j, and across sub-chunks it adds the sums of whole
sub-chunks in between (`sub_spans`), so nothing large is subtracted (docs/gla.md, "Sub-chunk sums
of the log decay").

Only step 1/3-style chunk-local work lives in `ops`, so the XLA (vectorised einsums) and Pallas
(one grid point per chunk) paths share this file: layout, padding, segments, scans and custom_vjp.
With `ops.block` set (the XLA path), the sequence is walked in blocks of that many chunks by an
outer scan carrying the state (and, backward, dS), so temporaries stay cache-sized on CPU; the
forward keeps each block's starting state (one [B, H, K, V] state per block) as a residual, so the
backward needs no extra state pass and recomputes only the chunk states inside each block.

Segments: `seg` is [N, B, 1, C] float, the number of document starts since the end of the previous
chunk (0 = same document as the chunk-start state). Row r sees key j iff seg[r] == seg[j]; row r
sees the chunk-start state iff seg[r] == 0; key j reaches S_{n+1} iff seg[j] == seg[C-1]; S_n
survives into S_{n+1} iff seg[C-1] == 0. Padded rows (k = v = q = g = 0) change nothing.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .reference import acc_dtype, resets_from_segments


class ChunkOps(NamedTuple):
    """Chunk-local primitives; arrays are [N, B, H, C, *] (N: chunks of this call or block),
    seg [N, B, 1, C] or None."""
    fwd_state: callable   # (k, v, L, seg) -> U [N,B,H,K,V]
    fwd_out: callable     # (q, k, v, L, seg, S) -> O [N,B,H,C,V]
    bwd_prep: callable    # (q, k, v, L, seg, dO) -> (U, W)
    # (q, k, v, L, seg, dO, S, dS_next) -> (dq, dk, dv, q⊙dq − k⊙dk_in, k⊙dk_out), dk_in the
    # part of dk from scores inside the chunk, dk_out the part through the chunk-end state
    bwd_grads: callable
    sub: int                    # rows per sub-chunk: L is the cumulative log decay within one
    # optional cheaper ops valid only where fast_ok(γ) holds (γ [.., K]: each chunk's total log
    # decay; a traced bool); chosen per block
    fast: "ChunkOps | None" = None
    fast_ok: callable = None
    block: int | None = None    # chunks processed at once (None: all); see _blocking


def _choose(ops, L, run, *args):
    """run(ops, *args) with ops.fast when ops.fast_ok(γ), else with ops (one lax.cond)."""
    if ops.fast is None:
        return run(ops, *args)
    return jax.lax.cond(ops.fast_ok(chunk_total(L, ops.sub)), functools.partial(run, ops.fast),
                        functools.partial(run, ops), *args)


# ----------------------------------------------------------------------------- layout
# Chunk-major [N, B, H, C, D]: the chunk scan runs over axis 0 without transposes, and every einsum
# has its batch dims (n, b, h) leading, which XLA:CPU's batched dot wants.

def to_chunks(x: jax.Array, chunk: int, token_major: bool = False) -> jax.Array:
    """[B, T, H, D] -> [N, B, H, C, D] (or [N, B, C, H, D] if token_major), zero-padding T."""
    B, T, H, D = x.shape
    n = -(-T // chunk)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0)))
    return x.reshape(B, n, chunk, H, D).transpose((1, 0, 2, 3, 4) if token_major else (1, 0, 3, 2, 4))


def from_chunks(x: jax.Array, T: int, token_major: bool = False) -> jax.Array:
    """Inverse of to_chunks (drops padding)."""
    x = x.transpose(1, 0, 2, 3, 4) if token_major else x.transpose(1, 0, 3, 2, 4)
    B, N, C, H, D = x.shape
    return x.reshape(B, N * C, H, D)[:, :T]


def _head_major(x):
    """[.., C, H, D] <-> [.., H, C, D]. Blocked ops keep whole-sequence arrays token-major (for
    B = 1 a free reshape of [B, T, H, D]) and transpose one cache-sized block at a time."""
    return jnp.swapaxes(x, -3, -2)


def segment_offsets(segment_ids: jax.Array, chunk: int) -> jax.Array:
    """[B, T] ids -> [N, B, 1, C] float: document starts since the previous chunk's last row.

    Padding repeats the last id so no reset is added after T. Float because kernels compare
    it with masks; counts ≤ C are exact in any float type.
    """
    B, T = segment_ids.shape
    n = -(-T // chunk)
    count = jnp.cumsum(resets_from_segments(segment_ids).astype(jnp.int32), axis=1)
    count = jnp.pad(count, ((0, 0), (0, n * chunk - T)), mode="edge").reshape(B, n, chunk)
    prev = jnp.concatenate([count[:, :1, :1], count[:, :-1, -1:]], axis=1)   # row before chunk
    return (count - prev).astype(jnp.float32).transpose(1, 0, 2)[:, :, None, :]


# ----------------------------------------------------------------------------- sub-chunk sums
# L [.., C, K]: cumulative log decay within each sub-chunk of `sub` rows (see the module doc).

def sub_totals(L: jax.Array, sub: int) -> jax.Array:
    """Each sub-chunk's total log decay [.., n, K] (L at its last row)."""
    return L[..., sub - 1::sub, :]


def sub_spans(L: jax.Array, sub: int) -> jax.Array:
    """[.., n, n, K]: entry [I, J] = Σ_{J ≤ M < I} total_M, the log decay of the whole sub-chunks
    J..I−1 (0 for I ≤ J), summed directly from the totals (one small matmul), never taken as a
    difference of two cumulative sums."""
    n = L.shape[-2] // sub
    i = np.arange(n)
    span = (i[None, :, None] <= i[None, None, :]) & (i[None, None, :] < i[:, None, None])
    return jnp.einsum("ijm,...mk->...ijk", jnp.asarray(span, L.dtype), sub_totals(L, sub),
                      precision=jax.lax.Precision.HIGHEST)


def _running(t: jax.Array, reverse: bool) -> jax.Array:
    """Exclusive prefix sums (Σ_{M < J}) or, reverse, inclusive suffix sums (Σ_{M ≥ J}) over the
    sub-chunk axis of totals [.., n, K], as plain adds XLA fuses into the elementwise work around
    them (n is small, so a matmul would be a separate op for little arithmetic; docs/gla.md,
    "Design decisions and their measurements")."""
    parts = [t[..., m, :] for m in range(t.shape[-2])]
    if reverse:
        sums = list(itertools.accumulate(parts[::-1]))[::-1]
    else:
        sums = list(itertools.accumulate(parts[:-1], initial=jnp.zeros_like(parts[0])))
    return jnp.stack(sums, axis=-2)


def absolute(L: jax.Array, sub: int) -> jax.Array:
    """The chunk-cumulative G [.., C, K] (for factors e^{±G} of a row against the chunk start)."""
    *lead, C, K = L.shape
    before = _running(sub_totals(L, sub), reverse=False)                      # [.., n, K]
    return (L.reshape(*lead, C // sub, sub, K) + before[..., :, None, :]).reshape(L.shape)


def to_end(L: jax.Array, sub: int) -> jax.Array:
    """γ − G [.., C, K]: each row's log decay to the chunk's end (≤ 0), from sub-chunk sums."""
    *lead, C, K = L.shape
    after = _running(sub_totals(L, sub), reverse=True)                        # Σ_{M ≥ J}
    return (after[..., :, None, :] - L.reshape(*lead, C // sub, sub, K)).reshape(L.shape)


def chunk_total(L: jax.Array, sub: int) -> jax.Array:
    """γ_n [.., K]: each chunk's total log decay."""
    return jnp.sum(sub_totals(L, sub), axis=-2)


def chunk_decay(L: jax.Array, sub: int, seg) -> jax.Array:
    """exp(γ_n) [N,B,H,K]; 0 when a document starts inside the chunk."""
    decay = jnp.exp(chunk_total(L, sub))
    if seg is not None:
        decay = decay * (seg[..., -1:] == 0).astype(decay.dtype)
    return decay


# ----------------------------------------------------------------------------- scans

def _unroll(n):
    """Fully unroll the short in-block chunk scans (XLA:CPU fuses the straight-line steps; a
    while loop costs a few thunks per step); long ones (Pallas, unblocked) stay loops."""
    return True if n <= 8 else 1


def forward_states(h0, decay, U):
    """Chunk-start states S_0..S_{N-1} [N, B, H, K, V] (S_0 = h0) and the final state S_N."""
    def step(s, xs):
        d, u = xs
        return d[..., :, None] * s + u, s
    final, starts = jax.lax.scan(step, h0, (decay, U), unroll=_unroll(U.shape[0]))
    return starts, final


def backward_states(dST, decay, W, S):
    """Reverse scan dS_n = diag(exp γ_n) dS_{n+1} + W_n from dS_N = dS_T.

    Returns dS_{n+1} for every chunk [N, B, H, K, V], dS_0 (= d initial_state) and the gate
    gradient's incoming-state term rowsum(diag(exp γ_n) S_n ⊙ dS_{n+1}) [N, B, H, K].
    """
    def step(ds, xs):
        d, w, s = xs
        return d[..., :, None] * ds + w, (ds, jnp.sum(d[..., :, None] * s * ds, axis=-1))
    dS0, (ends, rowsum) = jax.lax.scan(step, dST, (decay, W, S), reverse=True,
                                       unroll=_unroll(S.shape[0]))
    return ends, dS0, rowsum


def chunk_cumsum(x: jax.Array, reverse: bool = False, exclusive: bool = False) -> jax.Array:
    """(Reverse; exclusive: without the row itself) cumulative sum over the chunk axis (-2) as one
    triangular matmul.

    XLA:CPU lowers cumsum to a quadratic reduce-window and an unrolled running sum costs seconds
    of compile time. A two-level split would be faster but adds a rounding step, which the fp32
    gate gradient under strong gates cannot afford (docs/gla.md, "Design decisions and their
    measurements").
    """
    C = x.shape[-2]
    shift = -1 if exclusive else 0
    tri = np.triu(np.ones((C, C)), -shift) if reverse else np.tril(np.ones((C, C)), shift)
    return jnp.einsum("rc,...ck->...rk", jnp.asarray(tri, x.dtype), x,
                      precision=jax.lax.Precision.HIGHEST)


def _local_cumsum(ops, g):
    """L (cumulative sum within each sub-chunk) of a block, head-major, as one block-diagonal
    triangular matmul. Blocked (token-major) inputs are summed before the layout change:
    [C, C] x [C, H·K] is one plain matmul per chunk for XLA:CPU, where the head-major form needs
    transposes around the dot."""
    C = g.shape[-3] if ops.block is not None else g.shape[-2]
    rows = np.arange(C)
    tri = jnp.asarray((rows[:, None] >= rows[None, :])
                      & (rows[:, None] // ops.sub == rows[None, :] // ops.sub), g.dtype)
    if ops.block is None:
        return jnp.einsum("rc,...ck->...rk", tri, g, precision=jax.lax.Precision.HIGHEST)
    L = jnp.einsum("rc,...chk->...rhk", tri, g, precision=jax.lax.Precision.HIGHEST)
    return _head_major(L)


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_core(ops, q, k, v, g, h0, seg):
    return _core_fwd(ops, q, k, v, g, h0, seg)[0]


def _fwd_body(ops, q, k, v, L, h0, seg):
    S, final = forward_states(h0, chunk_decay(L, ops.sub, seg), ops.fwd_state(k, v, L, seg))
    return ops.fwd_out(q, k, v, L, seg, S), final


def _core_fwd(ops, q, k, v, g, h0, seg):
    """Forward and residuals. The fast/stable choice stays per block here (`_choose` inside the
    block scan), while the backward takes one for the whole call (`_core_bwd`): each is the faster
    arrangement for its pass (docs/gla.md, "Design decisions and their measurements")."""
    n_blocks, M = _blocking(ops, q.shape[0])
    hm = _head_major if ops.block is not None else (lambda x: x)

    def block(S, xs):
        qb, kb, vb, gb, sb = xs
        L = _local_cumsum(ops, gb.astype(h0.dtype))        # sub-chunk-local log decay
        qb, kb, vb = (hm(x) for x in (qb, kb, vb))
        o, S = _choose(ops, L, _fwd_body, qb, kb, vb, L, S, sb)
        return S, hm(o)

    if n_blocks == 1:
        final, o = block(h0, (q, k, v, g, seg))
        return (o, final), (q, k, v, g, h0, seg, None)

    def block_keep(S, xs):      # also keeps each block's starting state for the backward
        S_next, o = block(S, xs)
        return S_next, (o, S)

    final, (o, S0) = jax.lax.scan(block_keep, h0, _to_blocks((q, k, v, g, seg), M))
    return (_from_blocks(o, q.shape[0]), final), (q, k, v, g, h0, seg, S0)


def _core_bwd_impl(ops, res, cts):
    q, k, v, g, h0, seg, S0 = res
    do, dST = cts
    N = q.shape[0]
    n_blocks, M = _blocking(ops, N)
    hm = _head_major if ops.block is not None else (lambda x: x)
    zseg = None if seg is None else jnp.zeros_like(seg)

    def block(dS, xs):
        qb, kb, vb, gb, sb, dob, S0 = xs
        L = _local_cumsum(ops, gb.astype(h0.dtype))
        qb, kb, vb, gb, dob = (hm(x) for x in (qb, kb, vb, gb, dob))
        dq, dk, dv, dg, dS, _ = _choose(ops, L, _bwd_body, qb, kb, vb, gb, L, S0, sb, dob, dS)
        return dS, tuple(hm(x) for x in (dq, dk, dv, dg))

    if n_blocks == 1:
        dh0, grads = block(dST, (q, k, v, g, seg, do, h0))
        return grads + (dh0, zseg)

    # block-start states S0 come from the forward (one [B, H, K, V] state per block of
    # ops.block chunks: 4 MiB at T = 4096, B·H = 8), so no state pass is rerun here
    blocks = _to_blocks((q, k, v, g, seg, do), M)
    dh0, grads = jax.lax.scan(block, dST.astype(h0.dtype), blocks + (S0,), reverse=True)
    dq, dk, dv, dg = (_from_blocks(x, N) for x in grads)
    return dq, dk, dv, dg, dh0, zseg


def _blocking(ops, N):
    """(number of blocks, chunks per block). ops.block bounds the chunks handled at once: on CPU
    all-chunks-at-once temporaries outgrow the caches (docs/gla.md, "Design decisions and their
    measurements"), so the XLA path walks the sequence in cache-sized blocks, carrying the state
    between them."""
    if ops.block is None or N <= ops.block:
        return 1, N
    return -(-N // ops.block), ops.block


def _to_blocks(xs, M):
    """[N, ...] -> [N/M, M, ...], zero-padding N (zero chunks leave the state unchanged)."""
    def one(x):
        if x is None:
            return None
        n = -(-x.shape[0] // M)
        x = jnp.pad(x, ((0, n * M - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n, M, *x.shape[1:])
    return tuple(one(x) for x in xs)


def _from_blocks(x, N):
    return x.reshape(-1, *x.shape[2:])[:N]


def _bwd_body(ops, q, k, v, g, L, h0, seg, do, dST):
    acc = h0.dtype
    decay = chunk_decay(L, ops.sub, seg)
    U, W = ops.bwd_prep(q, k, v, L, seg, do)
    S, _ = forward_states(h0, decay, U)                  # recomputed, one state per chunk
    dS_end, dh0, rowsum = backward_states(dST.astype(acc), decay, W, S)
    dq, dk, dv, local, through = ops.bwd_grads(q, k, v, L, seg, do, S, dS_end)
    # Gate gradient, chunk-locally (no long cumsum -> no fp32 cancellation over T). Row s's log
    # decay scales the state entering step s, so dg_s is: the scores inside the chunk that span
    # s (reverse cumsum of q⊙dq − k⊙dk_in, without the exactly cancelling diagonal pair), plus
    # what of the chunk-end state passed through s: the incoming state's share (`rowsum`) and
    # the keys before s (exclusive cumsum of k⊙dk_out). The textbook form "rowsum(S_{n+1} ⊙
    # dS_{n+1}) − reverse cumsum of k⊙dk_out" is the same sum, but under strong gates it takes
    # two nearly equal large numbers apart and loses fp32 digits (docs/gla.md, "Backward and the
    # gate gradient").
    dg = (chunk_cumsum(local, reverse=True) + chunk_cumsum(through, exclusive=True)
          + rowsum[..., None, :])
    dseg = None if seg is None else jnp.zeros_like(seg)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
            dh0.astype(h0.dtype), dseg)


def _whole_call(ops, g, run, *args):
    """run(ops', *args) with ops' the fast ops when every chunk of the whole call qualifies
    (ops.fast_ok on each chunk's total log decay), else the stable ops: one lax.cond per call
    instead of one per block, so nothing inside the blocked scan is split by a conditional
    (XLA fuses across the cumsum, exponentials and layout changes)."""
    if ops.fast is None or ops.block is None:
        return run(ops, *args)
    # g is token-major [N, B, C, H, K] on the blocked path; γ_n = Σ_C g [N, B, H, K]
    gamma = jnp.sum(g.astype(jnp.float32), axis=2)
    fast = ops.fast._replace(block=ops.block)
    stable = ops._replace(fast=None, fast_ok=None)
    return jax.lax.cond(ops.fast_ok(gamma), functools.partial(run, fast),
                        functools.partial(run, stable), *args)


def _core_bwd(ops, res, cts):
    return _whole_call(ops, res[3], _core_bwd_impl, res, cts)


_chunked_core.defvjp(_core_fwd, _core_bwd)
# jit boundary around the core: eager callers compile it once per chunked shape (so T = 1..64 share
# one executable); inline=True splices it into an outer jit, which ran faster on XLA:CPU than a
# nested call (docs/gla.md, "Design decisions and their measurements").
_chunked_core_jit = jax.jit(_chunked_core, static_argnums=(0,), inline=True)


def chunked_gla(ops: ChunkOps, q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    """Validated [B, T, H, *] inputs -> (o [B, T, H, V] in q.dtype, final state [B, H, K, V])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = acc_dtype(q.dtype)
    h0 = (jnp.zeros((B, H, K, V), acc) if initial_state is None
          else initial_state.astype(acc))
    seg = None if segment_ids is None else segment_offsets(segment_ids, chunk_size)
    tm = ops.block is not None
    q, k, v, g = (to_chunks(x, chunk_size, tm) for x in (q, k, v, g))
    o, final = _chunked_core_jit(ops, q, k, v, g, h0, seg)
    return from_chunks(o, T, tm).astype(q.dtype), final
