"""The GLA recurrence step by step (impl="reference"): the ground truth and the decoding path.

Row-vector convention (docs/gla.md, "The recurrence"): S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,
o_t = s q_t S_t.
Everything is accumulated in fp32 (fp64 when the inputs are fp64); gradients come from autodiff of
the scan, which stores one state per step -- fine for a reference and for short decode chunks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def acc_dtype(dtype) -> jnp.dtype:
    """fp32 accumulation for bf16/fp16/fp32 inputs, fp64 for fp64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def resets_from_segments(segment_ids: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T] bool, True where the state must be cleared before step t.

    Step 0 never resets: initial_state belongs to the first segment of each row.
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def gla_step(q, k, v, g, state, *, scale=None, reset=None):
    """One decoding step. q, k, g: [B, H, K]; v: [B, H, V]; state: [B, H, K, V].

    Returns (o [B, H, V] in q.dtype, new_state in the state's accumulation dtype).
    `reset` ([B] bool, optional) clears the state before this step (new document).
    """
    acc = acc_dtype(jnp.result_type(q.dtype, state.dtype))
    s = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf, gf = (x.astype(acc) for x in (q, k, v, g))
    decay = jnp.exp(gf)
    if reset is not None:
        decay = jnp.where(reset[:, None, None], 0.0, decay)
    new = decay[..., None] * state.astype(acc) + kf[..., :, None] * vf[..., None, :]
    o = s * jnp.einsum("bhk,bhkv->bhv", qf, new, precision=jax.lax.Precision.HIGHEST)
    return o.astype(q.dtype), new


def recurrent_gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None):
    """Sequential recurrence over [B, T, H, *] inputs; returns (o [B,T,H,V], final_state [B,H,K,V]).

    Inputs must already be validated (see api.chunk_gla / api.recurrent_gla).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = acc_dtype(q.dtype)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, V), acc)
    resets = (jnp.zeros((B, T), bool) if segment_ids is None
              else resets_from_segments(segment_ids))

    def body(state, xs):
        qt, kt, vt, gt, rt = xs
        o, state = gla_step(qt, kt, vt, gt, state, scale=scale, reset=rt)
        return state, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, resets))
    final, o = jax.lax.scan(body, initial_state.astype(acc), xs)
    return jnp.moveaxis(o, 0, 1), final
