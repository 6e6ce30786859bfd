"""What every MoE dispatch path shares: the expert weights, the argument checks, the SwiGLU
expert, the final weighted combine, and the dense oracle `reference_ffn`.

Dtype policy of every path (docs/moe.md, "Dispatch"): matmuls take the inputs' dtype and
accumulate in float32; each expert's output row is rounded back to x's dtype (what a bf16 model
stores and exchanges), and the k rows of a token are combined with the router weights in float32.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ACC = jnp.float32


class ExpertWeights(NamedTuple):
    """Stacked SwiGLU expert weights: gate, up [E, d, f]; down [E, f, d].

    Expert e maps a row x[d] to (silu(x @ gate[e]) * (x @ up[e])) @ down[e]. A NamedTuple is a
    pytree, so the same structure carries PartitionSpecs and gradients."""
    gate: jax.Array
    up: jax.Array
    down: jax.Array


def check_routed(x, w: ExpertWeights, expert_ids, combine) -> tuple[int, int, int, int]:
    """Validates the arguments of the single-device paths; returns (N, k, E, d)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [N, d], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating dtype, got {x.dtype}")
    check_weights(w, x.shape[1])
    if expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids must be [N, k] with N = {x.shape[0]}, got {expert_ids.shape}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"expert_ids must be integer, got {expert_ids.dtype}")
    if combine.shape != expert_ids.shape:
        raise ValueError(f"combine must have the shape of expert_ids {expert_ids.shape}, "
                         f"got {combine.shape}")
    if not jnp.issubdtype(combine.dtype, jnp.floating):
        raise ValueError(f"combine must be a floating dtype, got {combine.dtype}")
    return x.shape[0], expert_ids.shape[1], w.gate.shape[0], x.shape[1]


def check_weights(w: ExpertWeights, d: int) -> None:
    """gate, up [E, d, f] and down [E, f, d] with one E and f."""
    if not isinstance(w, ExpertWeights):
        raise ValueError(f"weights must be an ExpertWeights(gate, up, down), got {type(w).__name__}")
    if w.gate.ndim != 3 or w.gate.shape[1] != d:
        raise ValueError(f"w.gate must be [E, d={d}, f], got {w.gate.shape}")
    E, _, f = w.gate.shape
    if w.up.shape != (E, d, f):
        raise ValueError(f"w.up must be [E, d, f] = {(E, d, f)}, got {w.up.shape}")
    if w.down.shape != (E, f, d):
        raise ValueError(f"w.down must be [E, f, d] = {(E, f, d)}, got {w.down.shape}")


def swiglu(gate_out, up_out, dtype):
    """silu(gate) * up on float32 matmul outputs, rounded to the compute dtype for the down
    projection."""
    return (jax.nn.silu(gate_out) * up_out).astype(dtype)


def combine_rows(combine, rows, dtype):
    """y[n] = sum_j combine[n, j] * rows[n, j] in float32; rows [N, k, d] -> [N, d] in dtype.

    Every path ends here, so gradients reach `combine` the same way in all of them."""
    y = jnp.einsum("nk,nkd->nd", combine.astype(ACC), rows.astype(ACC),
                   preferred_element_type=ACC)
    return y.astype(dtype)


def reference_ffn(x, w: ExpertWeights, expert_ids, combine):
    """The dense oracle: every expert runs on ALL N tokens, and its output is weighted by
    sum_j combine[n, j] * [expert_ids[n, j] == e]. Dropless by definition; E times the FLOPs of
    the routed paths, so it is for tests and tiny models.

    x [N, d], w ExpertWeights, expert_ids [N, k] int, combine [N, k] float -> y [N, d] in x.dtype.
    """
    N, _, E, d = check_routed(x, w, expert_ids, combine)
    onehot = expert_ids[..., None] == jnp.arange(E)                        # [N, k, E]
    # jnp.where, not a product with the mask: a NaN router weight of an unchosen expert must not
    # leak into the sum (NaN * 0 = NaN).
    per_expert = jnp.where(onehot, combine[..., None].astype(ACC), 0.0).sum(axis=1)   # [N, E]

    # A scan over experts keeps one [N, f] activation live instead of E of them.
    def one_expert(acc, xs):
        gate, up, down, weight = xs
        h = swiglu(jnp.dot(x, gate, preferred_element_type=ACC),
                   jnp.dot(x, up, preferred_element_type=ACC), x.dtype)
        out = jnp.dot(h, down, preferred_element_type=ACC).astype(x.dtype)
        return acc + weight[:, None] * out.astype(ACC), None

    y, _ = jax.lax.scan(one_expert, jnp.zeros((N, d), ACC),
                        (w.gate, w.up, w.down, per_expert.T))
    return y.astype(x.dtype)
