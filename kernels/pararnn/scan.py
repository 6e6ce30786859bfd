"""Linear recurrences h_l = A_l h_{l-1} + b_l: lax.scan, associative scan, Pallas kernel.

``impl`` (the words of ``paxlike.kernels.platform``): "reference" is the ``lax.scan`` step by
step, "xla" the ``lax.associative_scan``, "pallas" the kernel of ``pallas_scan``.

Structures (``kind``), with any number of leading batch dims ``...``:

* ``diagonal``: a, b [..., L, d], h0 [..., d]
* ``block2``:   a [..., L, 2, 2, d] (a[..., i, j, c] = dh_i[c]/dh_j[c]), b [..., L, 2, d], h0 [..., 2, d]
* ``dense``:    a [..., L, n, n], b [..., L, n], h0 [..., n]   (solver-internal, for checking)

``reverse=True`` runs the mirror recurrence h_l = A_l h_{l+1} + b_l from the terminal state
h_{L+1} = h0 (the shape of an adjoint recurrence). The public ``linear_scan`` has a custom VJP so
that it is differentiable with every impl, the Pallas kernel included (``pallas_call`` has no
autodiff rule); its backward is one more linear scan in the opposite direction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from ..platform import IMPLS, by_lowering_platform
from . import pallas_scan

KINDS = ("diagonal", "block2", "dense")
_A_EXTRA = {"diagonal": 0, "block2": 1, "dense": 1}  # a.ndim - b.ndim
_STATE_NDIM = {"diagonal": 1, "block2": 2, "dense": 1}


def matvec(kind, a, h):
    if kind == "diagonal":
        return a * h
    if kind == "block2":
        return jnp.einsum("...ijd,...jd->...id", a, h)
    return jnp.einsum("...ij,...j->...i", a, h)


def matmul(kind, a2, a1):
    if kind == "diagonal":
        return a2 * a1
    if kind == "block2":
        return jnp.einsum("...ijd,...jkd->...ikd", a2, a1)
    return jnp.einsum("...ij,...jk->...ik", a2, a1)


def transpose(kind, a):
    """A_l^T for each element (what the adjoint recurrence multiplies by)."""
    if kind == "diagonal":
        return a
    if kind == "block2":
        return jnp.swapaxes(a, -3, -2)
    return jnp.swapaxes(a, -1, -2)


# ----------------------------------------------------------------------------------------------
# Raw implementations on a single batch dim: a [B, L, ...], b [B, L, ...], h0 [B, ...].
# ----------------------------------------------------------------------------------------------
def _reference(kind, a, b, h0, reverse):
    def step(h, ab):
        h = matvec(kind, ab[0], h) + ab[1]
        return h, h

    _, hs = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
    return jnp.moveaxis(hs, 0, 1)


def _associative(kind, a, b, h0, reverse):
    # Fold h0 into the first element processed, then the b-part of the prefix composition is h.
    first = -1 if reverse else 0
    b = b.at[:, first].add(matvec(kind, a[:, first], h0))

    def combine(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return matmul(kind, a2, a1), matvec(kind, a2, b1) + b2

    return lax.associative_scan(combine, (a, b), reverse=reverse, axis=1)[1]


def _pallas(kind, a, b, h0, reverse, **kernel_opts):
    if kind == "dense":
        raise ValueError("impl='pallas' supports jacobian/kind 'diagonal' and 'block2', not 'dense'")
    if kind == "diagonal":
        out = pallas_scan.scan_planes((a,), (b,), (h0,), kind=kind, reverse=reverse, **kernel_opts)
        return out[0]
    planes_a = tuple(a[:, :, i, j] for i in range(2) for j in range(2))
    planes_b = (b[:, :, 0], b[:, :, 1])
    out = pallas_scan.scan_planes(planes_a, planes_b, (h0[:, 0], h0[:, 1]), kind=kind,
                                  reverse=reverse, **kernel_opts)
    return jnp.stack(out, axis=2)


def scan_raw(kind, a, b, h0, *, reverse=False, impl="reference", **kernel_opts):
    """Dispatch without a custom VJP (the solver differentiates at its own level); ``impl`` is a
    resolved one ("reference", "xla" or "pallas", not "auto")."""
    dtype = jnp.result_type(a, b, h0)
    a, b, h0 = a.astype(dtype), b.astype(dtype), h0.astype(dtype)
    if impl == "reference":
        return _reference(kind, a, b, h0, reverse)
    if impl == "xla":
        return _associative(kind, a, b, h0, reverse)
    if impl == "pallas":
        return _pallas(kind, a, b, h0, reverse, **kernel_opts)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def shift_in(h0, hs, reverse):
    """The states each step reads: h_{l-1} (forward) or h_{l+1} (reverse), boundary = h0."""
    if reverse:
        return jnp.concatenate([hs[:, 1:], h0[:, None]], axis=1)
    return jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)


def adjoint_coefficients(kind, a, reverse):
    """Coefficients of the adjoint scan: lambda_l = A_{l+1}^T lambda_{l+1} + g_l (mirrored)."""
    at = transpose(kind, a)
    zero = jnp.zeros_like(at[:, :1])
    if reverse:
        return jnp.concatenate([zero, at[:, :-1]], axis=1)
    return jnp.concatenate([at[:, 1:], zero], axis=1)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan_vjp(kind, reverse, impl, a, b, h0):
    return scan_raw(kind, a, b, h0, reverse=reverse, impl=impl)


def _scan_fwd(kind, reverse, impl, a, b, h0):
    hs = scan_raw(kind, a, b, h0, reverse=reverse, impl=impl)
    return hs, (a, hs, h0)


def _scan_bwd(kind, reverse, impl, res, g):
    a, hs, h0 = res
    # lambda_l = dLoss/db_l solves the mirror recurrence, so it is the same kernel reversed.
    lam = scan_raw(kind, adjoint_coefficients(kind, a, reverse), g, jnp.zeros_like(h0),
                   reverse=not reverse, impl=impl)
    prev = shift_in(h0, hs, reverse)
    if kind == "diagonal":
        da = lam * prev
    elif kind == "block2":
        da = lam[:, :, :, None, :] * prev[:, :, None, :, :]
    else:
        da = lam[..., :, None] * prev[..., None, :]
    first = -1 if reverse else 0
    dh0 = matvec(kind, transpose(kind, a[:, first]), lam[:, first])
    return da.astype(a.dtype), lam, dh0.astype(h0.dtype)


_scan_vjp.defvjp(_scan_fwd, _scan_bwd)


def infer_kind(a, b):
    extra = a.ndim - b.ndim
    if extra == 0:
        return "diagonal"
    if extra == 1 and b.ndim >= 3 and b.shape[-2] == 2 and a.shape[-3:-1] == (2, 2):
        return "block2"
    raise ValueError(
        f"linear_scan: cannot infer the structure from a{tuple(a.shape)} and b{tuple(b.shape)}; "
        "expected a [..., L, d] with b [..., L, d] (diagonal) or a [..., L, 2, 2, d] with "
        "b [..., L, 2, d] (2x2 blocks)")


def linear_scan(a, b, h0=None, *, reverse=False, impl="auto"):
    """Solve h_l = A_l h_{l-1} + b_l for l = 1..L (or the mirror recurrence with ``reverse``).

    a, b, h0 as in the module docstring (diagonal or 2x2 per-channel blocks; structure inferred
    from the shapes). h0 defaults to zeros. Returns h [..., L, d] (or [..., L, 2, d]).
    ``impl``: "reference" (lax.scan), "xla" (lax.associative_scan), "pallas" (the Pallas
    kernel; interpreted on CPU) or "auto" (see ``choose_impl``). Differentiable in a, b and h0.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    kind = infer_kind(a, b)
    sn = _STATE_NDIM[kind]
    if b.ndim < sn + 1:
        raise ValueError(f"linear_scan: b{tuple(b.shape)} has no time axis")
    if a.shape[:b.ndim - sn] != b.shape[:b.ndim - sn] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"linear_scan: a{tuple(a.shape)} does not match b{tuple(b.shape)}")
    batch = b.shape[:-(sn + 1)]
    state = b.shape[-sn:]
    h0 = jnp.zeros(batch + state, b.dtype) if h0 is None else jnp.asarray(h0)
    if h0.shape != batch + state:
        raise ValueError(f"linear_scan: h0 has shape {tuple(h0.shape)}, expected "
                         f"{tuple(batch + state)} for b{tuple(b.shape)}")
    length = b.shape[len(batch)]
    flat = lambda x: x.reshape((-1,) + x.shape[len(batch):])  # noqa: E731  (one batch dim)
    run = lambda impl: _scan_vjp(kind, bool(reverse), impl, flat(a), flat(b), flat(h0))
    out = by_platform(impl, kind, run, batch=math.prod(batch), length=length, width=b.shape[-1])
    return out.reshape(b.shape)


def by_platform(impl, kind, run, **shape):
    """run(impl) with impl="auto" resolved for the platform the program is *lowered for*
    (``paxlike.kernels.platform.by_lowering_platform``), not the host's default backend: an AOT
    compile for a TPU topology from a CPU host gets the Pallas kernel, a CPU run the reference
    scan."""
    if impl != "auto":
        return run(choose_impl(impl, kind=kind, **shape))
    cpu = choose_impl(impl, kind=kind, platform="cpu", **shape)
    accelerator = choose_impl(impl, kind=kind, platform="tpu", **shape)
    return by_lowering_platform(run, {"cpu": cpu}, accelerator)


def choose_impl(impl, *, kind, batch, length, width, platform=None):
    """Resolve impl="auto" for `platform` (default: the host's default backend).

    On CPU "auto" is "reference": the lax.scan was the fastest at every benchmarked shape
    (docs/pararnn.md, "Benchmarks"; benchmarks/pararnn.py). On GPU/TPU it is "pallas" (the design
    point of the kernel, and the published ParaRNN result; not measured here), except for dense
    Jacobians, which only the XLA paths support ("xla").
    """
    del batch, length, width  # the CPU choice did not depend on shape in the measured range
    if impl != "auto":
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
        return impl
    if (platform or jax.default_backend()) == "cpu":
        return "reference"
    return "xla" if kind == "dense" else "pallas"
