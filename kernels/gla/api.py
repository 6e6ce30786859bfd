"""Public GLA entry points: argument checks and dispatch to reference / xla / pallas."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..platform import IMPLS, by_lowering_platform
from . import reference
from .chunked import chunked_gla
from .reference import acc_dtype
from .xla import xla_ops

# Rows per sub-chunk: bounds every exponent inside a matmul (docs/gla.md, "Sub-chunk
# stabilisation").
SUB_CHUNK = 16


def _check(q, k, v, g, initial_state, segment_ids, scale):
    """Shape/dtype validation shared by all entry points; returns (B, T, H, K, V)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    B, T, H, K = q.shape
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"q, k, g must share one shape [B, T, H, K]: q {q.shape}, k {k.shape}, "
                         f"g {g.shape}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of q {q.shape}, got {v.shape}")
    if T < 1:
        raise ValueError(f"sequence length T must be >= 1, got {T}")
    V = v.shape[-1]
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, "
                         f"got {initial_state.shape}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integer, got {segment_ids.dtype}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")
    # numpy, not jnp: inside a jit trace a jnp op on a closed-over concrete g is itself traced
    if not isinstance(g, jax.core.Tracer) and bool(np.any(np.asarray(g) > 0)):
        # The chunked paths clamp exponents at 0 (their stability relies on g <= 0), so a positive
        # log decay would be silently wrong there. Only checkable on concrete arrays.
        raise ValueError("g is a log decay and must be <= 0 everywhere (found g > 0)")
    return B, T, H, K, V


def chunk_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
              segment_ids=None, chunk_size=64, impl="auto"):
    """Gated linear attention over a whole sequence.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; g is the per-step log decay and must be <= 0;
    initial_state: [B, H, K, V] (float32; float64 under x64 with fp64 inputs);
    segment_ids: [B, T] int, the state is cleared where the id changes (packed documents;
    initial_state feeds the first document of each row, final_state is the last document's).
    Returns (o [B, T, H, V] in q.dtype, final_state [B, H, K, V] in the accumulation dtype, or
    None unless output_final_state).

    impl: "reference" (the step-by-step recurrence, lax.scan; exact), "xla" (the chunked form in
    plain XLA, the CPU fast path), "pallas" (Pallas kernels; interpret mode on CPU), "auto"
    (pallas when the program is lowered for TPU/GPU, xla when lowered for CPU; xla everywhere for
    a non-power-of-two chunk_size).
    chunk_size must be a multiple of 16 (a power of two for pallas). Accumulation is fp32 for
    bf16/fp32 inputs (fp64 for fp64 inputs).
    """
    B, T, H, K, V = _check(q, k, v, g, initial_state, segment_ids, scale)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if not isinstance(chunk_size, int) or chunk_size < SUB_CHUNK or chunk_size % SUB_CHUNK:
        raise ValueError(f"chunk_size must be a positive multiple of {SUB_CHUNK}, got {chunk_size!r}")
    scale = float(K ** -0.5 if scale is None else scale)
    run = functools.partial(_run, q, k, v, g, scale=scale, initial_state=initial_state,
                            segment_ids=segment_ids, chunk_size=chunk_size)
    if impl == "auto" and chunk_size & (chunk_size - 1) == 0:
        # Chosen by the platform the program is lowered for, not the host's default backend, so an
        # AOT compile for a TPU topology from a CPU host gets the Mosaic kernels.
        o, final = by_lowering_platform(run, {"cpu": "xla"}, "pallas")
    else:
        o, final = run("xla" if impl == "auto" else impl)
    return o, (final if output_final_state else None)


def _run(q, k, v, g, impl, *, scale, initial_state, segment_ids, chunk_size):
    if impl == "reference":
        return reference.recurrent_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                       segment_ids=segment_ids)
    if impl == "xla":
        ops = xla_ops(scale, SUB_CHUNK, acc_dtype(q.dtype))
        return chunked_gla(ops, q, k, v, g, scale=scale, initial_state=initial_state,
                           segment_ids=segment_ids, chunk_size=chunk_size)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"impl='pallas' needs a power-of-two chunk_size, got {chunk_size}")
    from .pallas import pallas_gla   # keeps Pallas out of the import path of xla users
    return pallas_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                      segment_ids=segment_ids, chunk_size=chunk_size, sub=SUB_CHUNK)


def recurrent_gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None):
    """Sequential recurrence for decoding / short sequences; always returns the final state.

    Same shapes as chunk_gla; feed the returned state back as initial_state to continue.
    """
    B, T, H, K, V = _check(q, k, v, g, initial_state, segment_ids, scale)
    scale = float(K ** -0.5 if scale is None else scale)
    return reference.recurrent_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                   segment_ids=segment_ids)


def gla_step(q, k, v, g, state, *, scale=None):
    """One token: q, k, g [B, H, K], v [B, H, V], state [B, H, K, V] -> (o [B, H, V], state)."""
    if q.ndim != 3 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"gla_step wants q, k, g of one shape [B, H, K]: {q.shape}, {k.shape}, "
                         f"{g.shape}")
    B, H, K = q.shape
    if v.ndim != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"v must be [B, H, V] with B, H = {(B, H)}, got {v.shape}")
    if state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, got {state.shape}")
    return reference.gla_step(q, k, v, g, state, scale=scale)
