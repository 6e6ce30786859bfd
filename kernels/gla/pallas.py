"""Pallas GLA kernels (TPU/Mosaic and GPU/Triton share one kernel body per pass).

Three kernels, each with one grid point per (batch, head, chunk) -- every point independent, so
the grid is fully parallel on both targets and no cross-iteration scratch is needed (Triton has
none); the short chunk-to-chunk state scan runs in XLA (see chunked.py):

  _state_kernel  U_n = (K ⊙ e^{γ−G})ᵀ V  [and, for the backward, W_n = s (Q ⊙ e^G)ᵀ dO]
  _out_kernel    O_n = s (Q ⊙ e^G) S_n + A_n V_n
  _grads_kernel  dq, dk, dv and the two gate-gradient terms (chunked._bwd_body) of one chunk
                 given S_n and dS_{n+1}

Blocks are [n_sub, c, D] (sub-chunk c = 16): a sub-chunk is a leading-axis index of a ref, never a
value slice (Triton cannot slice register tensors), and the last two block dims equal the array's
(Mosaic's (8, 128) rule is then met for any K, V). Triton needs power-of-two tensor dims, so for
the "gpu" target K and V are zero-padded to a power of two >= 16 (zero q/k/g/v rows change
nothing).

Intra-chunk scores use the sub-chunk stabilisation (docs/gla.md, "Sub-chunk stabilisation":
off-diagonal sub-blocks as matmuls with a reference row ζ_I, diagonal sub-blocks elementwise in log
space), so no exponent is ever positive. The log decay arrives summed within each sub-chunk (L, see
chunked.py); `_Chunk` turns it into each exponent without subtracting two large cumulative sums.
All arithmetic is fp32 (fp64 for fp64 inputs in interpret mode); matmuls run at HIGHEST precision
so fp32 results do not degrade to bf16/tf32 passes on TPU/GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..platform import TARGETS, by_pallas_target
from .chunked import ChunkOps, chunked_gla
from .reference import acc_dtype

_HI = jax.lax.Precision.HIGHEST


def _mm(a, b, ta=False, tb=False):
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HI, preferred_element_type=a.dtype)


def _tile_masks(seg_c, seg_r, I, J, c):
    """Causal (if I == J) and same-document mask of sub-block (I, J) as [c, c] bool, or None."""
    mask = None
    if I == J:
        mask = (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
                >= jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))
    if seg_c is not None:
        same = seg_c[I] == seg_r[J]                                  # [c,1] vs [1,c]
        mask = same if mask is None else mask & same
    return mask


def _where(mask, x):
    return x if mask is None else jnp.where(mask, x, 0.0)


class _Chunk:
    """Loads of one chunk (per sub-chunk, cast to the accumulation dtype) and shared factors."""

    def __init__(self, refs, acc, n, c):
        self.r, self.acc, self.n, self.c = refs, acc, n, c
        self.totals = [refs["L"][m, c - 1:c, :].astype(acc) for m in range(n)]   # [1, K] each
        self.seg = refs.get("seg_c") is not None
        if self.seg:
            self.seg_c = [refs["seg_c"][i] for i in range(n)]         # [c, 1] each
            self.seg_r = [refs["seg_r"][i] for i in range(n)]         # [1, c] each
            self.seg_last = refs["seg_c"][n - 1, c - 1:c, :]          # [1, 1]
        else:
            self.seg_c = self.seg_r = None

    def ld(self, name, i):
        return self.r[name][i].astype(self.acc)

    # Exponents from L (log decay summed within each sub-chunk) and whole sub-chunks' totals:
    def span(self, J, I):
        """Log decay of the whole sub-chunks J..I−1 ([1, K]; 0 when I ≤ J)."""
        out = jnp.zeros_like(self.totals[0])
        for m in range(J, I):
            out = out + self.totals[m]
        return out

    def first(self, i):
        return self.r["L"][i, 0:1, :].astype(self.acc)             # L at sub-chunk i's first row

    def G(self, i):
        """Sub-chunk i's rows' log decay from the chunk start [c, K] (for e^G of q)."""
        return self.span(0, i) + self.ld("L", i)

    def to_end(self, i):
        """Sub-chunk i's rows' log decay to the chunk end [c, K] (γ − G, ≤ 0)."""
        return self.span(i, self.n) - self.ld("L", i)

    def from_zeta(self, i):
        """G − ζ_i of sub-chunk i's rows [c, K] (≤ 0), ζ_i = G at its first row."""
        return self.ld("L", i) - self.first(i)

    def to_zeta(self, I, J):
        """ζ_I − G of the keys of sub-chunk J < I [c, K] (≤ 0)."""
        return self.span(J, I) + self.first(I) - self.ld("L", J)

    def m_inter(self, i):      # rows that still see the chunk-start state
        return None if not self.seg else self.seg_c[i] == 0

    def m_last(self, i):       # keys that reach the chunk-end state
        return None if not self.seg else self.seg_c[i] == self.seg_last

    def score(self, q_i, I, J):
        """Unscaled masked A_IJ [c, c]; both exponents ≤ 0 by construction."""
        c = self.c
        mask = _tile_masks(self.seg_c, self.seg_r, I, J, c)
        if I > J:
            kz = self.ld("k", J) * jnp.exp(self.to_zeta(I, J))
            return _where(mask, _mm(q_i * jnp.exp(self.from_zeta(I)), kz, tb=True))
        L_i = self.ld("L", I)
        d = jnp.exp(jnp.minimum(L_i[:, None, :] - L_i[None, :, :], 0.0))
        a = jnp.sum(q_i[:, None, :] * self.ld("k", I)[None, :, :] * d, axis=-1)
        return _where(mask, a)


def _state_kernel(*refs, names, acc, n, c, scale, with_w):
    ins = dict(zip(names, refs[:len(names)]))
    outs = refs[len(names):]
    ch = _Chunk(ins, acc, n, c)
    u = w = None
    for i in range(n):
        kd = _where(ch.m_last(i), ch.ld("k", i) * jnp.exp(ch.to_end(i)))
        t = _mm(kd, ch.ld("v", i), ta=True)
        u = t if u is None else u + t
        if with_w:
            qd = _where(ch.m_inter(i), ch.ld("q", i) * jnp.exp(ch.G(i)))
            t = _mm(qd, ch.ld("do", i), ta=True)
            w = t if w is None else w + t
    outs[0][...] = u.astype(outs[0].dtype)
    if with_w:
        outs[1][...] = (scale * w).astype(outs[1].dtype)


def _out_kernel(*refs, names, acc, n, c, scale):
    ins = dict(zip(names, refs[:len(names)]))
    o_ref = refs[len(names)]
    ch = _Chunk(ins, acc, n, c)
    S = ins["S"][...].astype(acc)
    for I in range(n):
        q_i = ch.ld("q", I)
        o = _mm(_where(ch.m_inter(I), q_i * jnp.exp(ch.G(I))), S)
        for J in range(I + 1):
            o = o + _mm(ch.score(q_i, I, J), ch.ld("v", J))
        o_ref[I] = (scale * o).astype(o_ref.dtype)


def _grads_kernel(*refs, names, acc, n, c, scale):
    ins = dict(zip(names, refs[:len(names)]))
    dq_ref, dk_ref, dv_ref, local_ref, through_ref = refs[len(names):]
    ch = _Chunk(ins, acc, n, c)
    S, dSn = ins["S"][...].astype(acc), ins["dSn"][...].astype(acc)
    eye = (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
           == jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))
    dk, dv, dq_off, diag = [None] * n, [None] * n, [None] * n, [None] * n
    dk_out = [None] * n
    for J in range(n):          # state terms of dk, dv (keys reaching the chunk-end state)
        ed = _where(ch.m_last(J), jnp.exp(ch.to_end(J)))
        dk_out[J] = _mm(ch.ld("v", J), dSn, tb=True) * ed
        dk[J] = jnp.zeros_like(dk_out[J])
        dv[J] = _mm(ch.ld("k", J) * ed, dSn)
    for I in range(n):
        q_i, do_i = ch.ld("q", I), ch.ld("do", I)
        dq = scale * _where(ch.m_inter(I), _mm(do_i, S, tb=True) * jnp.exp(ch.G(I)))
        for J in range(I + 1):
            mask = _tile_masks(ch.seg_c, ch.seg_r, I, J, c)
            a = scale * ch.score(q_i, I, J)
            da = scale * _where(mask, _mm(do_i, ch.ld("v", J), tb=True))
            dv[J] = dv[J] + _mm(a, do_i, ta=True)
            k_j = ch.ld("k", J)
            if I > J:
                fk = jnp.exp(ch.to_zeta(I, J))
                fq = jnp.exp(ch.from_zeta(I))
                dq = dq + _mm(da, k_j * fk) * fq
                dk[J] = dk[J] + _mm(da, q_i * fq, ta=True) * fk
            else:   # the diagonal pair (t, t) is kept apart: see xla._with_diagonal
                diag[I] = jnp.sum(jnp.where(eye, da, 0.0), axis=1, keepdims=True)     # [c, 1]
                da = jnp.where(eye, 0.0, da)
                L_i = ch.ld("L", I)
                d = jnp.exp(jnp.minimum(L_i[:, None, :] - L_i[None, :, :], 0.0))
                dq = dq + jnp.sum(da[:, :, None] * k_j[None, :, :] * d, axis=1)
                dk[J] = dk[J] + jnp.sum(da[:, :, None] * q_i[:, None, :] * d, axis=0)
        dq_off[I] = dq
        dq_ref[I] = (dq + diag[I] * ch.ld("k", I)).astype(dq_ref.dtype)
    for J in range(n):
        q_j, k_j = ch.ld("q", J), ch.ld("k", J)
        dk_ref[J] = (dk[J] + dk_out[J] + diag[J] * q_j).astype(dk_ref.dtype)
        dv_ref[J] = dv[J].astype(dv_ref.dtype)
        # gate-gradient terms, kept apart (see chunked._bwd_body)
        local_ref[J] = (q_j * dq_off[J] - k_j * dk[J]).astype(local_ref.dtype)
        through_ref[J] = (k_j * dk_out[J]).astype(through_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call glue

def _call(kernel, ins, out_shapes, *, target, interpret, name):
    """ins: dict name -> (array, kind) with kind 'chunk' [N,B,H,n,c,D], 'seg' [N,B,n,a,b],
    'state' [N,B,H,K,V]; out_shapes: list of (shape, dtype, kind). Grid (N, B, H)."""
    N, B, H = next(x.shape[:3] for x, kind in ins.values() if kind in ("chunk", "state"))

    def spec(shape, kind):
        if kind == "seg":      # one segment row per (chunk, batch), shared by the heads
            return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda t, b, h: (t, b, 0, 0, 0))
        zeros = (0,) * (len(shape) - 3)
        return pl.BlockSpec((None, None, None) + tuple(shape[3:]),
                            lambda t, b, h: (t, b, h) + zeros)

    names = tuple(ins)
    params = {}
    if not interpret:
        if target == "tpu":
            from jax.experimental.pallas import tpu as pltpu
            params["compiler_params"] = pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "parallel"))
        else:
            from jax.experimental.pallas import triton as pltr
            params["compiler_params"] = pltr.CompilerParams(num_warps=4, num_stages=1)
    f = pl.pallas_call(
        functools.partial(kernel, names=names),
        grid=(N, B, H),
        in_specs=[spec(x.shape, kind) for x, kind in ins.values()],
        out_specs=[spec(s, kind) for s, _, kind in out_shapes],
        out_shape=[jax.ShapeDtypeStruct(s, d) for s, d, _ in out_shapes],
        interpret=interpret, name=name, **params)
    return f(*(x for x, _ in ins.values()))


def _sub(x, c):
    """[N,B,H,C,D] -> [N,B,H,C/c,c,D] (free reshape)."""
    *lead, C, D = x.shape
    return x.reshape(*lead, C // c, c, D)


def _seg_ins(seg, c):
    if seg is None:
        return {}
    N, B, _, C = seg.shape
    s = seg.reshape(N, B, C // c, c)
    return {"seg_c": (s[..., :, None], "seg"), "seg_r": (s[..., None, :], "seg")}


def _make_ops(scale, c, acc, target, interpret):
    kw = dict(target=target, interpret=interpret)
    common = dict(acc=acc, c=c, scale=scale)

    def fwd_state(k, v, L, seg, q=None, do=None):
        with_w = q is not None
        N, B, H, C, K = k.shape
        V = v.shape[-1]
        ins = {"k": (_sub(k, c), "chunk"), "v": (_sub(v, c), "chunk"), "L": (_sub(L, c), "chunk")}
        if with_w:
            ins.update(q=(_sub(q, c), "chunk"), do=(_sub(do, c), "chunk"))
        ins.update(_seg_ins(seg, c))
        outs = [((N, B, H, K, V), acc, "state")] * (2 if with_w else 1)
        res = _call(functools.partial(_state_kernel, n=C // c, with_w=with_w, **common), ins,
                    outs, name="gla_state_bwd" if with_w else "gla_state", **kw)
        return tuple(res) if with_w else res[0]

    def fwd_out(q, k, v, L, seg, S):
        C = q.shape[-2]
        ins = {"q": (_sub(q, c), "chunk"), "k": (_sub(k, c), "chunk"), "v": (_sub(v, c), "chunk"),
               "L": (_sub(L, c), "chunk"), "S": (S, "state")}
        ins.update(_seg_ins(seg, c))
        vs = _sub(v, c).shape
        (o,) = _call(functools.partial(_out_kernel, n=C // c, **common), ins,
                     [(vs, acc, "chunk")], name="gla_out", **kw)
        return o.reshape(v.shape)

    def bwd_prep(q, k, v, L, seg, do):
        return fwd_state(k, v, L, seg, q=q, do=do)

    def bwd_grads(q, k, v, L, seg, do, S, dSn):
        C = q.shape[-2]
        ins = {"q": (_sub(q, c), "chunk"), "k": (_sub(k, c), "chunk"), "v": (_sub(v, c), "chunk"),
               "L": (_sub(L, c), "chunk"), "do": (_sub(do, c), "chunk"), "S": (S, "state"),
               "dSn": (dSn, "state")}
        ins.update(_seg_ins(seg, c))
        qs, vs = _sub(q, c).shape, _sub(v, c).shape
        dq, dk, dv, local, through = _call(
            functools.partial(_grads_kernel, n=C // c, **common), ins,
            [(qs, acc, "chunk"), (qs, acc, "chunk"), (vs, acc, "chunk"), (qs, acc, "chunk"),
             (qs, acc, "chunk")], name="gla_grads", **kw)
        return (dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape),
                local.reshape(q.shape), through.reshape(q.shape))

    return ChunkOps(fwd_state, fwd_out, bwd_prep, bwd_grads, sub=c)


@functools.lru_cache(maxsize=None)
def pallas_ops(scale: float, sub: int, acc, target: str, interpret: bool) -> ChunkOps:
    return _make_ops(scale, sub, jnp.dtype(acc), target, interpret)


# The target whose body is interpreted on platforms without a Pallas compiler (CPU): the TPU body,
# which takes any K and V as they are (the GPU body pads them to powers of two).
_INTERPRETED_ELSEWHERE = "tpu"


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def pallas_gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, sub,
               target=None, interpret=None):
    """chunked_gla with Pallas chunk kernels; target "tpu" (Mosaic) | "gpu" (Triton).

    target=None picks the target from the platform the program is *lowered for*
    (`paxlike.kernels.platform.by_pallas_target`), not from the host's default backend: an AOT
    compile for a TPU topology from a CPU host gets the Mosaic kernels, an export for CUDA the
    Triton ones, a CPU run the TPU body in interpret mode. `interpret`, when given, overrides the
    platform's choice.
    """
    args = (q, k, v, g, initial_state, segment_ids)
    kw = dict(scale=scale, chunk_size=chunk_size, sub=sub)
    if target is not None:
        return _pallas_gla(*args, target=target, interpret=bool(interpret), **kw)
    return by_pallas_target(
        lambda t, interpreted: _pallas_gla(*args, target=t, interpret=interpreted, **kw),
        interpreted_elsewhere=_INTERPRETED_ELSEWHERE, interpret=interpret)


def _pallas_gla(q, k, v, g, initial_state, segment_ids, *, scale, chunk_size, sub, target,
                interpret):
    if target not in TARGETS:
        raise ValueError(f"unknown Pallas target {target!r}; expected one of {TARGETS}")
    K, V = q.shape[-1], v.shape[-1]
    Kp, Vp = (_pow2(K), _pow2(V)) if target == "gpu" else (K, V)
    if (Kp, Vp) != (K, V):
        padk = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, Kp - K),))
        q, k, g = padk(q), padk(k), padk(g)
        v = jnp.pad(v, ((0, 0),) * 3 + ((0, Vp - V),))
        if initial_state is not None:
            initial_state = jnp.pad(initial_state, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    ops = pallas_ops(scale, sub, acc_dtype(q.dtype), target, interpret)
    o, final = chunked_gla(ops, q, k, v, g, scale=scale, initial_state=initial_state,
                           segment_ids=segment_ids, chunk_size=chunk_size)
    return o[..., :V], final[:, :, :K, :V]
