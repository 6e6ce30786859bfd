"""Pallas kernels for the linear recurrence h_l = A_l h_{l-1} + b_l (diagonal or per-channel 2x2 A).

Two kernel bodies, one per target, because the two compilers want different shapes of work:

* ``tpu`` (Mosaic): grid (batch, channel tiles, time blocks). The time axis is the innermost,
  sequential ("arbitrary") grid axis; the state crossing block boundaries lives in a VMEM scratch.
  Inside a (block_t, block_d) block the recurrence is solved by a Hillis-Steele scan along the
  sublane axis (log2(block_t) steps of ``pltpu.roll`` + compose), so every vector op works on full
  (8, 128) tiles instead of one row at a time.
* ``gpu`` (Triton): grid (batch, channel tiles, time chunks). Triton has no shift/roll of register
  tensors (only a forward cumsum), so inside a program the recurrence is walked row by row, with
  ``unroll`` rows loaded before they are consumed so that several global loads are in flight.
  Sequences longer than 512 are cut into 256-step chunks for parallelism: compose each chunk,
  scan the chunk aggregates, re-walk each chunk from its carry-in state (``_gpu_call``).

Both run on CPU with ``interpret=True`` (that is how the tests check their numerics) and both
support ``reverse`` natively (the time traversal is mirrored, no flip copies of the inputs).

Layout: planes. A diagonal recurrence is one ``a`` plane and one ``b`` plane of shape [B, L, d];
a 2x2 recurrence is four ``a`` planes (a00, a01, a10, a11) and two ``b`` planes. ``h0`` planes are
[B, 1, d] (a unit second-minor dim keeps Mosaic's (8, 128) block rule satisfied). Compute is fp32.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..platform import TARGETS, by_pallas_target

# Per-kind element algebra on tuples of planes. ``compose(later, earlier)`` is the scan combine.
_N_A = {"diagonal": 1, "block2": 4}
_N_B = {"diagonal": 1, "block2": 2}
_IDENT_A = {"diagonal": (1.0,), "block2": (1.0, 0.0, 0.0, 1.0)}


def _apply(kind, a, b, h):
    """A h + b for one element (planes broadcast against h)."""
    if kind == "diagonal":
        return (a[0] * h[0] + b[0],)
    a00, a01, a10, a11 = a
    return (a00 * h[0] + a01 * h[1] + b[0], a10 * h[0] + a11 * h[1] + b[1])


def _compose(kind, later, earlier):
    """(A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2): applying ``earlier`` first, then ``later``."""
    (a2, b2), (a1, b1) = later, earlier
    if kind == "diagonal":
        return (a2[0] * a1[0],), (a2[0] * b1[0] + b2[0],)
    p00, p01, p10, p11 = a2
    q00, q01, q10, q11 = a1
    a = (p00 * q00 + p01 * q10, p00 * q01 + p01 * q11,
         p10 * q00 + p11 * q10, p10 * q01 + p11 * q11)
    return a, _apply(kind, a2, b2, b1)


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic) body
# ----------------------------------------------------------------------------------------------
def _tpu_kernel(*refs, kind, reverse, block_t):
    from jax.experimental.pallas import tpu as pltpu

    na, nb = _N_A[kind], _N_B[kind]
    a_refs = refs[:na]
    b_refs = refs[na:na + nb]
    h0_refs = refs[na + nb:na + 2 * nb]
    out_refs = refs[na + 2 * nb:na + 3 * nb]
    carry_refs = refs[na + 3 * nb:]

    @pl.when(pl.program_id(2) == 0)
    def _init():
        for c, h in zip(carry_refs, h0_refs):
            c[...] = h[...].astype(jnp.float32)

    a = tuple(r[...].astype(jnp.float32) for r in a_refs)
    b = tuple(r[...].astype(jnp.float32) for r in b_refs)
    row = lax.broadcasted_iota(jnp.int32, a[0].shape, 0)
    k = 1
    while k < block_t:  # Hillis-Steele: after the step with offset k, row i holds rows (i-2k, i]
        shift = block_t - k if reverse else k  # roll only takes non-negative shifts
        valid = row < block_t - k if reverse else row >= k
        a_e = tuple(jnp.where(valid, pltpu.roll(x, shift, 0), i)
                    for x, i in zip(a, _IDENT_A[kind]))
        b_e = tuple(jnp.where(valid, pltpu.roll(x, shift, 0), 0.0) for x in b)
        a, b = _compose(kind, (a, b), (a_e, b_e))
        k *= 2
    h = _apply(kind, a, b, tuple(c[...] for c in carry_refs))
    last = 0 if reverse else block_t - 1
    for o, c, v in zip(out_refs, carry_refs, h):
        o[...] = v.astype(o.dtype)
        c[...] = v[last:last + 1, :]


def _tpu_call(a, b, h0, *, kind, reverse, block_t, block_d, interpret):
    from jax.experimental.pallas import tpu as pltpu

    bsz, length, d = a[0].shape
    nt, nd = length // block_t, d // block_d
    if reverse:
        t_map = lambda i, j, t: (i, nt - 1 - t, j)  # noqa: E731  (visit time blocks last-first)
    else:
        t_map = lambda i, j, t: (i, t, j)  # noqa: E731
    seq_spec = pl.BlockSpec((None, block_t, block_d), t_map)
    h_spec = pl.BlockSpec((None, 1, block_d), lambda i, j, t: (i, 0, j))
    out_dtype = b[0].dtype
    return pl.pallas_call(
        functools.partial(_tpu_kernel, kind=kind, reverse=reverse, block_t=block_t),
        grid=(bsz, nd, nt),
        in_specs=[seq_spec] * (len(a) + len(b)) + [h_spec] * len(h0),
        out_specs=[seq_spec] * len(b),
        out_shape=[jax.ShapeDtypeStruct((bsz, length, d), out_dtype)] * len(b),
        scratch_shapes=[pltpu.VMEM((1, block_d), jnp.float32)] * len(b),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"pararnn_scan_{kind}{'_rev' if reverse else ''}",
    )(*a, *b, *h0)


# ----------------------------------------------------------------------------------------------
# GPU (Triton) body
# ----------------------------------------------------------------------------------------------
def _gpu_walk(kind, reverse, length, unroll, a_refs, b_refs, state, visit):
    """Walk one chunk row by row in processing order: state = visit(t, a_t, b_t, state)."""
    def body(i, state):
        base = length - (i + 1) * unroll if reverse else i * unroll
        steps = [base + (unroll - 1 - u if reverse else u) for u in range(unroll)]
        # Issue every load of the unrolled group first: they do not depend on the state.
        loads = [(tuple(r[t, :].astype(jnp.float32) for r in a_refs),
                  tuple(r[t, :].astype(jnp.float32) for r in b_refs)) for t in steps]
        for t, (a, b) in zip(steps, loads):
            state = visit(t, a, b, state)
        return state

    return lax.fori_loop(0, length // unroll, body, state)


def _gpu_kernel(*refs, kind, reverse, length, unroll):
    """h over one chunk from its carry-in state (the whole sequence when unchunked)."""
    na, nb = _N_A[kind], _N_B[kind]
    a_refs, b_refs = refs[:na], refs[na:na + nb]
    h0_refs, out_refs = refs[na + nb:na + 2 * nb], refs[na + 2 * nb:]

    def visit(t, a, b, h):
        h = _apply(kind, a, b, h)
        for o, v in zip(out_refs, h):
            o[t, :] = v.astype(o.dtype)
        return h

    h = tuple(r[0, :].astype(jnp.float32) for r in h0_refs)
    _gpu_walk(kind, reverse, length, unroll, a_refs, b_refs, h, visit)


def _gpu_aggregate_kernel(*refs, kind, reverse, length, unroll):
    """The chunk's composed element (A_last ... A_first, b_agg): pass 1 of the chunked scan."""
    na, nb = _N_A[kind], _N_B[kind]
    a_refs, b_refs = refs[:na], refs[na:na + nb]
    agg_a_refs, agg_b_refs = refs[na + nb:2 * na + nb], refs[2 * na + nb:]
    zero = jnp.zeros(agg_b_refs[0].shape[1:], jnp.float32)
    agg = (tuple(zero + i for i in _IDENT_A[kind]), tuple(zero for _ in range(nb)))
    agg = _gpu_walk(kind, reverse, length, unroll, a_refs, b_refs, agg,
                    lambda t, a, b, agg: _compose(kind, (a, b), agg))
    for o, v in zip(agg_a_refs + agg_b_refs, agg[0] + agg[1]):
        o[0, :] = v


def _gpu_call(a, b, h0, *, kind, reverse, block_d, chunk, unroll, interpret, num_warps=1,
              num_stages=2):
    """Unchunked (chunk == L): one program per (batch, channel tile) walks the whole sequence.

    Chunked: the sequence is cut into L/chunk chunks so that there are L/chunk times more
    programs (a GPU needs thousands to hide load latency; B*d/32 alone is a few hundred):
    pass 1 composes each chunk into one element, pass 2 scans those few elements (the unchunked
    kernel on [B, L/chunk, d]), pass 3 re-walks every chunk from its carry-in state. It reads
    A and b twice.
    """
    from jax.experimental.pallas import triton as plgpu

    bsz, length, d = a[0].shape
    n_chunks = length // chunk
    grid = (bsz, d // block_d, n_chunks)
    seq_spec = pl.BlockSpec((None, chunk, block_d), lambda i, j, c: (i, c, j))
    row_spec = pl.BlockSpec((None, 1, block_d), lambda i, j, c: (i, c, j))
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    name = f"pararnn_scan_{kind}{'_rev' if reverse else ''}"
    rows = jax.ShapeDtypeStruct((bsz, n_chunks, d), jnp.float32)
    if n_chunks > 1:
        aggs = pl.pallas_call(
            functools.partial(_gpu_aggregate_kernel, kind=kind, reverse=reverse, length=chunk,
                              unroll=unroll),
            grid=grid, in_specs=[seq_spec] * (len(a) + len(b)),
            out_specs=[row_spec] * (len(a) + len(b)), out_shape=[rows] * (len(a) + len(b)),
            compiler_params=params, interpret=interpret, name=name + "_aggregate",
        )(*a, *b)
        ends = _gpu_call(aggs[:len(a)], aggs[len(a):], h0, kind=kind, reverse=reverse,
                         block_d=block_d, chunk=n_chunks, unroll=1, interpret=interpret)
        # carry-in of chunk c: the state after the chunk processed just before it (h0 first)
        if reverse:
            h0 = tuple(jnp.concatenate([e[:, 1:], h], axis=1) for e, h in zip(ends, h0))
        else:
            h0 = tuple(jnp.concatenate([h, e[:, :-1]], axis=1) for e, h in zip(ends, h0))
    return pl.pallas_call(
        functools.partial(_gpu_kernel, kind=kind, reverse=reverse, length=chunk, unroll=unroll),
        grid=grid,
        in_specs=[seq_spec] * (len(a) + len(b)) + [row_spec] * len(h0),
        out_specs=[seq_spec] * len(b),
        out_shape=[jax.ShapeDtypeStruct((bsz, length, d), b[0].dtype)] * len(b),
        compiler_params=params, interpret=interpret, name=name,
    )(*a, *b, *h0)


# ----------------------------------------------------------------------------------------------
# Entry point on planes: padding and tile choice
# ----------------------------------------------------------------------------------------------
_FORCED = []  # stack of (target, interpret) set by ``target``


@contextlib.contextmanager
def target(target, interpret=False):
    """Force the kernel body, target "tpu" | "gpu" (and interpret mode), whatever the platform; by
    default the body follows the platform the program is lowered for."""
    if target not in TARGETS:
        raise ValueError(f"unknown Pallas target {target!r}; expected one of {TARGETS}")
    _FORCED.append((target, bool(interpret)))
    try:
        yield
    finally:
        _FORCED.pop()


# The target whose body is interpreted on platforms without a Pallas compiler (CPU): the GPU body,
# because in interpret mode its per-row loop over wide channel tiles compiles and runs faster than
# the TPU body's block-wise Hillis-Steele scan (docs/pararnn.md, "Design decisions and their
# measurements").
_INTERPRETED_ELSEWHERE = "gpu"


def _pad_to(x, axis, size, value):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def scan_planes(a, b, h0, *, kind, reverse=False, target=None, interpret=None,
                block_t=None, block_d=None, unroll=8, chunk=None):
    """Run the kernel on plane tuples: a (1 or 4 planes) and b (1 or 2) [B, L, d]; h0 planes [B, d].

    Returns the tuple of output planes [B, L, d]. L and d are padded to whole blocks: time padding
    is identity elements (A = I, b = 0) appended at the end, which leave every real output alone in
    both directions (reverse starts from the padded end, where identities just carry h0 through).

    target: "tpu" | "gpu", or None for the innermost ``target`` context, else the platform the
    program is lowered for (``paxlike.kernels.platform.by_pallas_target``).
    """
    if target is None and not _FORCED:
        # chosen for the platform the program is lowered for, not the host's default backend
        return by_pallas_target(
            lambda t, interpreted: scan_planes(a, b, h0, kind=kind, reverse=reverse, target=t,
                                               interpret=interpreted, block_t=block_t,
                                               block_d=block_d, unroll=unroll, chunk=chunk),
            interpreted_elsewhere=_INTERPRETED_ELSEWHERE, interpret=interpret)
    if target is None:
        target, forced_interpret = _FORCED[-1]
        interpret = forced_interpret if interpret is None else interpret
    interpret = bool(interpret)
    bsz, length, d = b[0].shape
    if target == "tpu":
        if block_d is None:  # lanes: 128 on hardware; wide tiles in interpret mean fewer grid steps
            block_d = min(1024, -(-d // 128) * 128) if interpret else 128
        if block_t is None:
            block_t = 256 if length >= 256 else max(8, 1 << (length - 1).bit_length())
        t_mult, d_mult = block_t, block_d
    elif target == "gpu":
        if block_d is None and interpret:  # one program per sequence: fewest interpreted steps
            block_d = d
        elif block_d is None:  # Triton tiles are powers of two; 32 lanes = one warp per program
            block_d = 32 if d >= 32 else max(1, 1 << (d - 1).bit_length())
        if chunk is None:  # interpreted: unchunked (fewest steps); hardware: 256-step chunks
            chunk = None if interpret or length <= 512 else 256
        if chunk is not None and (chunk % unroll or chunk & (chunk - 1)):
            raise ValueError(f"chunk={chunk} must be a power of two and a multiple of unroll")
        t_mult, d_mult = chunk or unroll, block_d
    else:
        raise ValueError(f"unknown Pallas target {target!r}; expected one of {TARGETS}")
    lp, dp = -(-length // t_mult) * t_mult, -(-d // d_mult) * d_mult
    a = tuple(_pad_to(_pad_to(x, 2, dp, 0.0), 1, lp, i) for x, i in zip(a, _IDENT_A[kind]))
    b = tuple(_pad_to(_pad_to(x, 2, dp, 0.0), 1, lp, 0.0) for x in b)
    h0 = tuple(_pad_to(x, 1, dp, 0.0)[:, None, :] for x in h0)
    if target == "tpu":
        out = _tpu_call(a, b, h0, kind=kind, reverse=reverse, block_t=block_t, block_d=block_d,
                        interpret=interpret)
    else:
        out = _gpu_call(a, b, h0, kind=kind, reverse=reverse, block_d=block_d,
                        chunk=chunk or lp, unroll=unroll, interpret=interpret)
    return tuple(o[:, :length, :d] for o in out)
