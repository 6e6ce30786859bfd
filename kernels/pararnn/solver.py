"""Newton solver over the whole sequence for h_l = f(h_{l-1}, x_l), with an implicit-function VJP.

Forward: F_l(H) = h_l - f(h_{l-1}, x_l) = 0 is solved by Newton's method. Each step linearises f at
the current iterate and solves the resulting linear recurrence with ``scan.scan_raw``:
    delta_l = J_l delta_{l-1} + r_l,  J_l = df/dh(h_{l-1}, x_l),  r_l = f(h_{l-1}, x_l) - h_l.
Backward: never through the iterations. At the solution, lambda_l = g_l + J_{l+1}^T lambda_{l+1}
(one reverse linear scan), then the gradients for xs, h0 and the closed-over parameters are the VJP
of the batched cell f(shift(H), X) with cotangent lambda. Only (xs, H, h0, params) are saved.

A Newton result that misses the tolerance is reported, never silently returned as converged: the
per-iteration residuals are in ``info``, a ``ConvergenceWarning`` is emitted from the device
program, and ``fallback`` ("reference" or "damped") can recover the answer.

The mathematics: docs/pararnn.md, "Newton over the sequence" and "Backward by implicit
differentiation".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import context
from . import scan as scan_lib

JACOBIANS = ("diagonal", "block2", "dense")
FALLBACKS = (None, "reference", "damped")  # reference: rerun as the lax.scan of the cell


class ConvergenceWarning(RuntimeWarning):
    """Newton's final residual is above the tolerance (and no fallback fixed it)."""


def default_tol(dtype) -> float:
    """Residual threshold used to judge convergence when ``tol`` is None (fixed iterations)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return 1e-8
    if dtype == jnp.float32:
        return 1e-4
    return 2e-2  # bf16 / f16: about 4 ulps at 1.0


@dataclasses.dataclass(frozen=True)
class _Config:
    cell: Callable  # closure-converted: cell(h, x, *consts)
    jac: Callable | None  # closure-converted analytic Jacobian: jac(h, x, *jconsts)
    kind: str
    iterations: int
    tol: float | None
    threshold: float
    impl: str
    fallback: str | None
    fallback_iterations: int
    warn: bool
    with_residual: bool  # reference impl: compute the (tiny) residual only when asked for
    axis_name: Any = None  # mesh axes the sequence is split over (inside shard_map), or None


def _shift(cfg, h0, H):
    """h_{l-1} for every step (h0 before the first; across blocks when the sequence is split)."""
    if cfg.axis_name:
        return context.shift_in(h0, H, cfg.axis_name)
    return scan_lib.shift_in(h0, H, False)


def _scan(cfg, a, b, h0, reverse=False):
    if cfg.axis_name:
        return context.scan(cfg.kind, a, b, h0, reverse=reverse, impl=cfg.impl,
                            axis_name=cfg.axis_name)
    return scan_lib.scan_raw(cfg.kind, a, b, h0, reverse=reverse, impl=cfg.impl)


def _residual(cfg, consts, h0, xs, H):
    """max_l |f(h_{l-1}, x_l) - h_l| over the whole sequence (every block agrees on it)."""
    return _global_max(cfg, _max_abs(_cell_all(cfg, consts, _shift(cfg, h0, H), xs) - H))


def _global_max(cfg, x):
    return jax.lax.pmax(x, cfg.axis_name) if cfg.axis_name else x


# ----------------------------------------------------------------------------------------------
# Batched cell evaluation and Jacobians (leading dims [B, L])
# ----------------------------------------------------------------------------------------------
def _cell_all(cfg, consts, hprev, xs):
    f = lambda h, x: cfg.cell(h, x, *consts).astype(h.dtype)  # noqa: E731
    return jax.vmap(jax.vmap(f))(hprev, xs)


def _one_jacobian(cfg, consts, jconsts, h, x):
    """(f(h, x), J) for one step, J in the layout of ``scan`` for ``cfg.kind``."""
    f = lambda hh: cfg.cell(hh, x, *consts).astype(h.dtype)  # noqa: E731
    if cfg.jac is not None:
        return f(h), jnp.asarray(cfg.jac(h, x, *jconsts)).astype(h.dtype)
    if cfg.kind == "diagonal":  # J is diagonal, so J @ 1 is its diagonal: one JVP
        return jax.jvp(f, (h,), (jnp.ones_like(h),))
    fh, lin = jax.linearize(f, h)
    if cfg.kind == "block2":  # column j of every 2x2 block: tangent = ones in state row j
        basis = jnp.eye(2, dtype=h.dtype)[:, :, None] * jnp.ones_like(h)[None]
        return fh, jax.vmap(lin, out_axes=1)(basis)  # J[i, j, c]
    basis = jnp.eye(h.shape[0], dtype=h.dtype)
    return fh, jax.vmap(lin, out_axes=1)(basis)  # dense J[i, k]


def _f_and_jac(cfg, consts, jconsts, hprev, xs):
    one = functools.partial(_one_jacobian, cfg, consts, jconsts)
    return jax.vmap(jax.vmap(one))(hprev, xs)


def _max_abs(r):
    # Any non-finite entry makes the residual +inf: XLA's max-reduce on CPU does not propagate
    # NaN (an all-NaN array reduces to -inf), which would otherwise read as "converged".
    m = jnp.max(jnp.abs(r)).astype(jnp.float32)
    return jnp.where(jnp.all(jnp.isfinite(r)), m, jnp.inf)


def _converged(res, threshold):
    return res <= threshold  # False for NaN


def _damp(kind, J):
    """Scale each Jacobian block to infinity-norm <= 1 so the linear scan cannot blow up."""
    if kind == "diagonal":
        return jnp.clip(J, -1.0, 1.0)
    if kind == "block2":
        norm = jnp.max(jnp.sum(jnp.abs(J), axis=-2), axis=-2)[..., None, None, :]
    else:
        norm = jnp.max(jnp.sum(jnp.abs(J), axis=-1), axis=-1)[..., None, None]
    return J / jnp.maximum(norm, 1.0)


# ----------------------------------------------------------------------------------------------
# Forward solvers
# ----------------------------------------------------------------------------------------------
def _reference_solve(cfg, consts, h0, xs):
    def step(h, x):
        h = jax.vmap(lambda hh, xx: cfg.cell(hh, xx, *consts).astype(hh.dtype))(h, x)
        return h, h

    def solve_block(h_in):
        _, hs = lax.scan(step, h_in, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs))
        return jnp.moveaxis(hs, 0, 1)
    if cfg.axis_name:
        return context.relay(solve_block, h0, cfg.axis_name)
    return solve_block(h0)


def _newton_loop(cfg, consts, jconsts, h0, xs, H, n_iters, damped):
    """Up to ``n_iters`` Newton steps from H; stops early once under ``cfg.tol`` when one is set.

    A while_loop even for a fixed count: one copy of the scan kernel in the program (unrolling
    multiplies compile time, badly so for interpreted Pallas), at the price of one Jacobian
    more than needed on the last step. Returns (H, residual history [n_iters], iterations run).
    After an early stop the history holds the final residual (the iterate no longer changes).
    """
    zeros = jnp.zeros_like(h0)

    def linearise(H):
        F, J = _f_and_jac(cfg, consts, jconsts, _shift(cfg, h0, H), xs)
        r = F - H
        return r, (_damp(cfg.kind, J) if damped else J), _global_max(cfg, _max_abs(r))

    def newton_step(H, r, J):
        return H + _scan(cfg, J, r, zeros)

    def cond(c):
        k, _, _, _, res, _ = c
        if cfg.tol is None and not damped:
            return k < n_iters
        return (k < n_iters) & ~_converged(res, cfg.threshold)

    def body(c):
        k, H, r, J, _, hist = c
        H = newton_step(H, r, J)
        r, J, res = linearise(H)
        return k + 1, H, r, J, res, hist.at[k].set(res)

    r, J, res0 = linearise(H)
    init = (jnp.int32(0), H, r, J, res0, jnp.zeros((n_iters,), jnp.float32))
    k, H, _, _, res, hist = lax.while_loop(cond, body, init)
    hist = jnp.where(jnp.arange(n_iters) < k, hist, res)
    return H, hist, k


def _report(final_res, threshold, converged, fallback_used):
    if not bool(converged):
        warnings.warn(
            f"pararnn.solve: final residual {float(final_res):.3e} is above the tolerance "
            f"{float(threshold):.1e}" + (" even after the fallback" if bool(fallback_used) else "")
            + "; the returned states are not a converged solution. Use more iterations or "
            "fallback='reference'.", ConvergenceWarning, stacklevel=2)


def _forward(cfg, consts, jconsts, h0, xs):
    if cfg.impl == "reference":
        H = _reference_solve(cfg, consts, h0, xs)
        if cfg.with_residual:
            res = _residual(cfg, consts, h0, xs, H)
        else:
            res = jnp.float32(0.0)  # exact by construction (up to rounding)
        return H, dict(residuals=res[None], iterations=jnp.int32(0), final_residual=res,
                       converged=jnp.bool_(True), fallback_used=jnp.bool_(False))

    H_init = _cell_all(cfg, consts, jnp.zeros(_xs_lead(xs) + h0.shape[1:], h0.dtype), xs)
    H, hist, k = _newton_loop(cfg, consts, jconsts, h0, xs, H_init, cfg.iterations, False)
    res = hist[-1]
    converged = _converged(res, cfg.threshold)
    fallback_used = jnp.bool_(False)
    if cfg.fallback is not None:
        def recover(H):
            if cfg.fallback == "reference":
                H = _reference_solve(cfg, consts, h0, xs)
                return H, _residual(cfg, consts, h0, xs, H)
            # Damped: continue from the Newton iterate per sequence when it is finite, else
            # restart from the initial guess (a diverged Newton iterate is no starting point).
            finite = jnp.all(jnp.isfinite(H), axis=tuple(range(1, H.ndim)), keepdims=True)
            if cfg.axis_name:  # a sequence restarts on every block or on none
                finite = _global_max(cfg, (~finite).astype(jnp.int32)) == 0
            H = jnp.where(finite, H, H_init)
            H, dhist, _ = _newton_loop(cfg, consts, jconsts, h0, xs, H,
                                       cfg.fallback_iterations, True)
            return H, dhist[-1]

        fallback_used = ~converged
        H, res = lax.cond(converged, lambda H: (H, res), recover, H)
        converged = _converged(res, cfg.threshold)
    if cfg.warn:
        jax.debug.callback(_report, res, jnp.float32(cfg.threshold), converged, fallback_used)
    return H, dict(residuals=hist, iterations=k, final_residual=res, converged=converged,
                   fallback_used=fallback_used)


def _xs_lead(xs):
    return jax.tree.leaves(xs)[0].shape[:2]


# ----------------------------------------------------------------------------------------------
# custom VJP: implicit differentiation through one reverse linear scan
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve_core(cfg, consts, jconsts, h0, xs):
    return _forward(cfg, consts, jconsts, h0, xs)


def _solve_fwd(cfg, consts, jconsts, h0, xs):
    H, info = _forward(cfg, consts, jconsts, h0, xs)
    return (H, info), (consts, jconsts, h0, xs, H)


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _solve_bwd(cfg, saved, cts):
    consts, jconsts, h0, xs, H = saved
    g = cts[0]
    hprev = _shift(cfg, h0, H)
    _, J = _f_and_jac(cfg, consts, jconsts, hprev, xs)
    # reference impl: the adjoint is a lax.scan too; otherwise the same kernel, reversed
    coefficients = scan_lib.adjoint_coefficients(cfg.kind, J, False)
    dh0 = lambda dhprev: dhprev[:, 0]  # noqa: E731
    if cfg.axis_name:
        # lambda_l = g_l + J_{l+1}^T lambda_{l+1}: at the block's last step J_{l+1} is the next
        # block's first; the state passed back is that block's lambda. Only block 0 reads h0.
        last = scan_lib.transpose(cfg.kind, context.next_first(J, cfg.axis_name))
        coefficients = coefficients.at[:, -1].set(last)
        first = jax.lax.axis_index(cfg.axis_name) == 0
        dh0 = lambda dhprev: jnp.where(first, dhprev[:, 0], 0)  # noqa: E731
    lam = _scan(cfg, coefficients, g.astype(H.dtype), jnp.zeros_like(h0), reverse=True)
    _, vjp = jax.vjp(lambda c, x, hp: _cell_all(cfg, c, hp, x), consts, xs, hprev)
    dconsts, dxs, dhprev = vjp(lam)
    return dconsts, [_zero_cotangent(c) for c in jconsts], dh0(dhprev), dxs


_solve_core.defvjp(_solve_fwd, _solve_bwd)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def solve(cell: Callable, h0, xs: Any, *, jacobian: str = "diagonal", iterations: int = 3,
          tol: float | None = None, impl: str = "auto", return_info: bool = False,
          jacobian_fn: Callable | None = None, fallback: str | None = None,
          fallback_iterations: int | None = None, warn: bool = True, axis_name=None):
    """Run ``h_l = cell(h_{l-1}, x_l)`` over sequences; returns hs [..., L, *state].

    Args:
      cell: one step on one sequence, ``cell(h, x) -> h_next``; h is [d] (or [2, d] for
        ``jacobian="block2"``). May close over parameters (arrays or tracers): gradients with
        respect to them flow (``jax.closure_convert``).
      h0: [..., d] or [..., 2, d]; leading dims are batch dims.
      xs: array or pytree of arrays [..., L, ...] with the same batch dims as h0.
      jacobian: structure of df/dh: "diagonal", "block2" (per-channel 2x2 blocks, state [2, d])
        or "dense" (small d; for checking). Taken from autodiff of ``cell`` unless
        ``jacobian_fn(h, x)`` gives it analytically ([d], [2, 2, d] or [n, n]). For "diagonal"
        and "block2" the autodiff Jacobian is exact only if the cell really has that structure;
        Newton then converges slowly (reported), but the backward adjoint uses the same J, so
        the gradients of a mis-declared cell are wrong: declare "dense" when unsure.
      iterations: Newton iterations (fixed count), or the maximum count when ``tol`` is set.
      tol: stop early once max_l |h_l - f(h_{l-1}, x_l)| <= tol; also the convergence threshold
        (default ``default_tol(dtype)``: 1e-4 in fp32).
      impl: "reference" (lax.scan of the cell, exact; on CPU also the fastest), "xla" (Newton +
        lax.associative_scan), "pallas" (Newton + Pallas scan kernel) or "auto"
        (``scan.choose_impl`` for the platform the program is lowered for, ``scan.by_platform``:
        "reference" on CPU, "pallas" on TPU/GPU; with ``return_info`` for the host's default
        backend, because the info of the two choices differs in shape).
      return_info: also return a dict: residuals [iterations] (max-abs residual after each
        iteration), iterations (run), final_residual, converged, fallback_used.
      fallback: None, "reference" (rerun with lax.scan when not converged) or "damped"
        (further quasi-Newton steps with Jacobian blocks scaled to norm <= 1).
      fallback_iterations: damped steps at most (default max(4 * iterations, 16)).
      warn: emit a ``ConvergenceWarning`` from the program when the result is not converged.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the sequence is split over: xs
        holds this device's block of L, h0 is the state before the whole sequence, and the
        blocks pass states, Newton corrections and adjoints to each other
        (``kernels/pararnn/context.py``). Newton's stopping test and the reported residuals are
        taken over the whole sequence; impl "reference" relays the sequential scan block to
        block (exact, as much work as one device scanning everything).
    """
    if jacobian not in JACOBIANS:
        raise ValueError(f"unknown jacobian {jacobian!r}; expected one of {JACOBIANS}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; expected one of {FALLBACKS}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number or None, got {tol!r}")
    h0 = jnp.asarray(h0)
    if not jnp.issubdtype(h0.dtype, jnp.floating):
        raise ValueError(f"h0 must be floating point, got {h0.dtype}")
    sn = 2 if jacobian == "block2" else 1
    if h0.ndim < sn or (jacobian == "block2" and h0.shape[-2] != 2):
        raise ValueError(f"h0 of shape {tuple(h0.shape)} does not fit jacobian={jacobian!r} "
                         f"(expected [..., {'2, ' if sn == 2 else ''}d])")
    batch, state = h0.shape[:h0.ndim - sn], h0.shape[h0.ndim - sn:]
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError("xs has no arrays")
    leaves = [jnp.asarray(x) for x in leaves]
    if any(x.ndim < len(batch) + 1 or x.shape[:len(batch)] != batch for x in leaves):
        raise ValueError(f"every xs leaf must be [{', '.join(map(str, batch))}{', ' if batch else ''}"
                         f"L, ...] to match h0 {tuple(h0.shape)}; got "
                         f"{[tuple(x.shape) for x in leaves]}")
    lengths = {x.shape[len(batch)] for x in leaves}
    if len(lengths) != 1:
        raise ValueError(f"xs leaves disagree on the sequence length: {sorted(lengths)}")
    (length,) = lengths
    shape = dict(batch=math.prod(batch), length=length, width=state[-1])
    if return_info:  # the info of a reference and a Newton solve differ in shape: one impl
        impl = scan_lib.choose_impl(impl, kind=jacobian, **shape)
    if axis_name is not None:
        try:
            jax.lax.axis_index(axis_name)
        except NameError as e:
            raise ValueError(f"axis_name={axis_name!r}: {e}; call solve inside a jax.shard_map "
                             "over the mesh axes that split the sequence") from None
    if impl == "pallas" and jacobian == "dense":
        raise ValueError("impl='pallas' supports jacobian 'diagonal' and 'block2', not 'dense'")

    xs = jax.tree.map(jnp.asarray, xs)
    h0f = h0.reshape((-1,) + state)
    xsf = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[len(batch):]), xs)
    h_ex = jax.ShapeDtypeStruct(state, h0.dtype)
    x_ex = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), xsf)
    try:
        out = jax.eval_shape(cell, h_ex, x_ex)
    except Exception as e:  # a shape error inside the cell is an argument error here
        raise ValueError(f"cell(h, x) fails on one step with h {tuple(state)} and x "
                         f"{jax.tree.map(lambda s: tuple(s.shape), x_ex)}: {e}") from e
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(state):
        raise ValueError(f"cell(h, x) must return an array of the state shape {tuple(state)}, "
                         f"got {getattr(out, 'shape', type(out))}")
    # Hoist closed-over tracers (parameters under grad/jit) into explicit arguments, so the
    # custom VJP can return their cotangents instead of leaking tracers.
    zeros_h = jnp.zeros(state, h0.dtype)
    zeros_x = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), x_ex)
    conv_cell, consts = jax.closure_convert(cell, zeros_h, zeros_x)
    conv_jac, jconsts = None, []
    if jacobian_fn is not None:
        conv_jac, jconsts = jax.closure_convert(jacobian_fn, zeros_h, zeros_x)

    def run(impl):
        cfg = _Config(
            cell=conv_cell, jac=conv_jac, kind=jacobian, iterations=iterations,
            tol=None if tol is None else float(tol),
            threshold=float(tol) if tol is not None else default_tol(h0.dtype), impl=impl,
            fallback=fallback,
            fallback_iterations=fallback_iterations or max(4 * iterations, 16), warn=warn,
            with_residual=return_info,
            axis_name=tuple(axis_name) if isinstance(axis_name, (tuple, list)) else axis_name)
        H, info = _solve_core(cfg, list(consts), list(jconsts), h0f, xsf)
        H = H.reshape(batch + (length,) + state)
        return (H, info) if return_info else H
    return scan_lib.by_platform(impl, jacobian, run, **shape)
