"""Chunk-local GLA primitives in plain XLA, vectorised over [N, B, H] (the CPU fast path).

All chunks of a block (see chunked._blocking) are handled at once with batched einsums, so XLA
sees a few large fused ops instead of a per-chunk loop. Two sets of ops:

Stable ops (any gate): intra-chunk scores use the secondary (sub-chunk) stabilisation of
docs/gla.md, "Sub-chunk stabilisation":

* off-diagonal sub-blocks I > J: A_IJ = (Q_I ⊙ e^{G_I − ζ_I}) (K_J ⊙ e^{ζ_I − G_J})ᵀ with ζ_I the
  cumulative decay at the first row of sub-chunk I; both exponents are ≤ 0, so nothing overflows
  however strong the gates are, and it is a plain matmul;
* diagonal sub-blocks: elementwise in log space, Σ_k q_rk k_jk e^{G_rk − G_jk} (exponent clamped
  at 0 so the masked upper triangle cannot produce inf).

Fast ops (bounded gates, picked per block by a lax.cond): one whole-chunk factorisation, below.

The log decay arrives as L, summed within each sub-chunk (chunked.py explains why); exponents of
a row against the chunk's ends come from `absolute` / `to_end`, those of two rows from L and the
sums of whole sub-chunks between them.

Inputs arrive in their own dtype and are upcast to the accumulation dtype (fp32, or fp64 for fp64
inputs): on CPU bf16 matmuls are slower than fp32 ones, and fp32 keeps the bf16 error budget for
the input rounding alone.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .chunked import ChunkOps, absolute, sub_spans, to_end

_HI = jax.lax.Precision.HIGHEST


def _ein(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HI)


def _tmm(a, b):
    """aᵀ b over the chunk axis: [.., C, X], [.., C, Y] -> [.., X, Y].

    XLA:CPU only hands dots with the contraction on the lhs's last axis to its fast (YNNPACK)
    kernels; the algebraic simplifier would fold a plain transpose back into the dot, so the
    transposed operand is pinned with an optimisation barrier (docs/gla.md, "Design decisions and
    their measurements").
    """
    at = jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2))
    return _ein("...xc,...cy->...xy", at, b)


def _masks(seg, C):
    """(m_inter [N,B,1,C,1], m_last [N,B,1,C,1], same-document [N,B,1,C,C]) or Nones."""
    if seg is None:
        return None, None, None
    s = seg
    return ((s == 0)[..., None], (s == s[..., -1:])[..., None],
            s[..., :, None] == s[..., None, :])


def _apply(x, m):
    return x if m is None else jnp.where(m, x, 0.0)


class _Intra:
    """Stabilised intra-chunk factors of one call, shared by scores and their gradients."""

    def __init__(self, q, k, L, sub):
        *lead, C, K = L.shape
        n = C // sub
        self.n, self.c = n, sub
        Ls = L.reshape(*lead, n, sub, K)
        first = Ls[..., :, :1, :]                  # [.., n, 1, K]; ζ_I = G at this row
        self.qs = q.reshape(*lead, n, sub, K)
        self.ks = k.reshape(*lead, n, sub, K)
        self.fq = jnp.exp(Ls - first)                                      # ≤ 1 factors
        self.qz = self.qs * self.fq
        # E[I, j] = exp(ζ_I − G_j) for keys j before sub-chunk I, else 0: [.., n, C, K], with
        # ζ_I − G_j = (whole sub-chunks J(j)..I−1) + first_I − L_j
        before = np.arange(C)[None, :] < (np.arange(n) * sub)[:, None]
        span = sub_spans(L, sub)[..., :, :, None, :]                       # [.., I, J, 1, K]
        lag = (span + first[..., :, None, :, :] - Ls[..., None, :, :, :]).reshape(*lead, n, C, K)
        self.E = jnp.where(before[:, :, None], jnp.exp(jnp.minimum(lag, 0)), 0.0)
        self.kz = k[..., None, :, :] * self.E
        # diagonal blocks, elementwise in log space; causal mask inside the block
        causal = np.tril(np.ones((sub, sub), bool))
        diff = Ls[..., :, :, None, :] - Ls[..., :, None, :, :]             # [.., n, c, c, K]
        self.D = jnp.where(causal[:, :, None], jnp.exp(jnp.minimum(diff, 0)), 0.0)

    def scores(self):
        """Unscaled causal A [.., C, C] (no document mask)."""
        n, c = self.n, self.c
        off = _ein("...irk,...ijk->...irj", self.qz, self.kz)             # [.., n, c, C]
        diag = jnp.sum(self.qs[..., :, None, :] * self.ks[..., None, :, :] * self.D, -1)
        eye = np.eye(n, dtype=bool)[:, None, :, None]
        off = off.reshape(*off.shape[:-1], n, c)
        full = jnp.where(eye, diag[..., :, :, None, :], off)
        return full.reshape(*full.shape[:-4], n * c, n * c)

    def grads(self, dA):
        """(dq, dk) [.., C, K] of Σ dA ⊙ A for a causal dA [.., C, C]."""
        n, c = self.n, self.c
        lead = dA.shape[:-2]
        dA5 = dA.reshape(*lead, n, c, n * c)
        dq_off = _ein("...irj,...ijk->...irk", dA5, self.kz) * self.fq
        dk_off = jnp.sum(_ein("...irj,...irk->...ijk", dA5, self.qz) * self.E, axis=-3)
        dAd = jnp.moveaxis(jnp.diagonal(dA.reshape(*lead, n, c, n, c), axis1=-4, axis2=-2), -1, -3)
        dq_d = jnp.sum(dAd[..., None] * self.ks[..., None, :, :] * self.D, axis=-2)
        dk_d = jnp.sum(dAd[..., None] * self.qs[..., :, None, :] * self.D, axis=-3)
        C = n * c
        return (dq_off.reshape(*lead, C, -1) + dq_d.reshape(*lead, C, -1),
                dk_off + dk_d.reshape(*lead, C, -1))


def _fwd_state(k, v, L, seg, *, acc, sub):
    k, v = k.astype(acc), v.astype(acc)
    _, m_last, _ = _masks(seg, L.shape[-2])
    kd = _apply(k * jnp.exp(to_end(L, sub)), m_last)
    return _ein("...ck,...cv->...kv", kd, v)


def _fwd_out(q, k, v, L, seg, S, *, acc, scale, sub):
    q, k, v = (x.astype(acc) for x in (q, k, v))
    m_inter, _, same = _masks(seg, L.shape[-2])
    inter = _ein("...ck,...kv->...cv", _apply(q * jnp.exp(absolute(L, sub)), m_inter), S)
    A = _apply(_Intra(q, k, L, sub).scores(), same)
    return scale * (inter + _ein("...rj,...jv->...rv", A, v))


def _bwd_prep(q, k, v, L, seg, do, *, acc, scale, sub):
    m_inter, _, _ = _masks(seg, L.shape[-2])
    U = _fwd_state(k, v, L, seg, acc=acc, sub=sub)
    W = scale * _ein("...ck,...cv->...kv",
                     _apply(q.astype(acc) * jnp.exp(absolute(L, sub)), m_inter), do.astype(acc))
    return U, W


def _bwd_grads(q, k, v, L, seg, do, S, dSn, *, acc, scale, sub):
    q, k, v, do = (x.astype(acc) for x in (q, k, v, do))
    C = L.shape[-2]
    m_inter, m_last, same = _masks(seg, C)
    causal = np.tril(np.ones((C, C), bool))
    mask = causal if same is None else same & causal
    dA = scale * jnp.where(mask, _ein("...rv,...jv->...rj", do, v), 0.0)
    intra = _Intra(q, k, L, sub)
    A = scale * jnp.where(mask, intra.scores(), 0.0)
    dA_diag, dA_strict = _split_diagonal(dA)
    dq_i, dk_i = intra.grads(dA_strict)
    ed = _apply(jnp.exp(to_end(L, sub)), m_last)              # key -> chunk-end decay
    dv = _ein("...rj,...rv->...jv", A, do) + _ein("...jk,...kv->...jv", k * ed, dSn)
    dq = scale * _apply(_ein("...rv,...kv->...rk", do, S) * jnp.exp(absolute(L, sub)),
                        m_inter) + dq_i
    dk_out = _ein("...jv,...kv->...jk", v, dSn) * ed
    dq, dk_in, local = _with_diagonal(q, k, dq, dk_i, dA_diag)
    return dq, dk_in + dk_out, dv, local, k * dk_out


def _split_diagonal(dA):
    """(diag(dA) [.., C, 1], dA with a zero diagonal)."""
    eye = np.eye(dA.shape[-1], dtype=bool)
    return jnp.sum(jnp.where(eye, dA, 0.0), -1, keepdims=True), jnp.where(eye, 0.0, dA)


def _with_diagonal(q, k, dq_off, dk_off, dA_diag):
    """Full dq, dk (of the given terms) and the gate-gradient term q⊙dq − k⊙dk.

    The pair (t, t) adds dA_tt q_t k_t to both q⊙dq and k⊙dk; it is by far the largest term under
    strong gates, and subtracting it numerically costs fp32 dg its digits. Leaving it out of the
    difference (it cancels exactly) gives the same dg without that cancellation (docs/gla.md,
    "Backward and the gate gradient").
    """
    q, k = q.astype(dq_off.dtype), k.astype(dq_off.dtype)
    local = q * dq_off - k * dk_off
    return dq_off + dA_diag * k, dk_off + dA_diag * q, local


# ----------------------------------------------------------------------------- fast path
# With ζ = 0 (the chunk start) a single factorisation over the whole chunk,
#   A = (Q ⊙ e^G)(K ⊙ e^{−G})ᵀ,   U = e^γ ⊙ (K ⊙ e^{−G})ᵀ V,
# is exact as long as e^{−G} cannot overflow. Each factor is one exp of the same rounded G the
# stable path uses, so accuracy is unchanged; the gain is on CPU, where the elementwise diagonal
# blocks cost more than all matmuls: two exps per element in total and Q ⊙ e^G, K ⊙ e^{−G} shared
# by every product. Weak gates (τ = 16: |G| over a chunk is ~3-10) always qualify; the driver
# falls back to the stable ops above for a block in which any chunk spans more than _FAST_RANGE.
_FAST_RANGE = 60.0          # e^60 ≈ 1e26: products with |q|, |k|, K stay far from fp32 overflow


def fast_ok(gamma):
    """Every chunk's total log decay γ within range (G is monotone: γ is its minimum)."""
    return jnp.all(-gamma <= _FAST_RANGE)


def _factors(q, k, G, acc):
    return q.astype(acc) * jnp.exp(G), k.astype(acc) * jnp.exp(-G)


def _fast_state(k, v, L, seg, *, acc, sub):
    G = absolute(L, sub)
    _, m_last, _ = _masks(seg, G.shape[-2])
    kz = _apply(k.astype(acc) * jnp.exp(-G), m_last)
    return jnp.exp(G[..., -1, :])[..., :, None] * _tmm(kz, v.astype(acc))


def _fast_out(q, k, v, L, seg, S, *, acc, scale, sub):
    G = absolute(L, sub)
    C = G.shape[-2]
    m_inter, _, same = _masks(seg, C)
    qe, kz = _factors(q, k, G, acc)
    causal = np.tril(np.ones((C, C), bool))
    A = jnp.where(causal if same is None else same & causal, _ein("...rk,...jk->...rj", qe, kz), 0.)
    inter = _ein("...ck,...kv->...cv", _apply(qe, m_inter), S)
    return scale * (inter + _ein("...rj,...jv->...rv", A, v.astype(acc)))


def _fast_prep(q, k, v, L, seg, do, *, acc, scale, sub):
    G = absolute(L, sub)
    m_inter, _, _ = _masks(seg, G.shape[-2])
    qe = q.astype(acc) * jnp.exp(G)
    W = scale * _tmm(_apply(qe, m_inter), do.astype(acc))
    return _fast_state(k, v, L, seg, acc=acc, sub=sub), W


def _fast_grads(q, k, v, L, seg, do, S, dSn, *, acc, scale, sub):
    G = absolute(L, sub)
    C = G.shape[-2]
    v, do = v.astype(acc), do.astype(acc)
    m_inter, m_last, same = _masks(seg, C)
    causal = np.tril(np.ones((C, C), bool))
    mask = causal if same is None else same & causal
    qe, kz = _factors(q, k, G, acc)
    A = scale * jnp.where(mask, _ein("...rk,...jk->...rj", qe, kz), 0.0)
    dA = scale * jnp.where(mask, _ein("...rv,...jv->...rj", do, v), 0.0)
    dSg = jnp.exp(G[..., -1, :])[..., :, None] * dSn            # e^γ folded into the state grad
    dv = _tmm(A, do) + _ein("...jk,...kv->...jv", _apply(kz, m_last), dSg)
    dA_diag, dA = _split_diagonal(dA)
    dq = jnp.exp(G) * (_apply(scale * _ein("...rv,...kv->...rk", do, S), m_inter)
                       + _ein("...rj,...jk->...rk", dA, kz))
    eG = jnp.exp(-G)
    dk_out = eG * _apply(_ein("...jv,...kv->...jk", v, dSg), m_last)
    dq, dk_in, local = _with_diagonal(q, k, dq, eG * _tmm(dA, qe), dA_diag)
    return dq, dk_in + dk_out, dv, local, k.astype(acc) * dk_out


@functools.lru_cache(maxsize=None)
def xla_ops(scale: float, sub: int, acc, block: int | None = 4) -> ChunkOps:
    """ChunkOps for the vectorised XLA path (cached so identical calls share one object).

    block: chunks vectorised at once; 4 keeps each block's temporaries cache-sized on CPU and was
    the fastest setting measured (docs/gla.md, "Design decisions and their measurements")."""
    acc = jnp.dtype(acc)
    fast = ChunkOps(
        fwd_state=functools.partial(_fast_state, acc=acc, sub=sub),
        fwd_out=functools.partial(_fast_out, acc=acc, scale=scale, sub=sub),
        bwd_prep=functools.partial(_fast_prep, acc=acc, scale=scale, sub=sub),
        bwd_grads=functools.partial(_fast_grads, acc=acc, scale=scale, sub=sub), sub=sub)
    return ChunkOps(
        fwd_state=functools.partial(_fwd_state, acc=acc, sub=sub),
        fwd_out=functools.partial(_fwd_out, acc=acc, scale=scale, sub=sub),
        bwd_prep=functools.partial(_bwd_prep, acc=acc, scale=scale, sub=sub),
        bwd_grads=functools.partial(_bwd_grads, acc=acc, scale=scale, sub=sub),
        sub=sub, fast=fast, fast_ok=fast_ok, block=block)
