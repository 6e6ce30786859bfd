"""ParaGRU and ParaLSTM cells (docs/pararnn.md, "Cells") as pure functions of (params, h, x).

``x`` is the already-projected input, B x + b, stacked per gate ([3, d]): the projection is one
GEMM over the whole sequence outside the solver, so the cell only holds the diagonal recurrent
weights. The analytic Jacobians are optional speed-ups for ``solve(jacobian_fn=...)``; the tests
check them against ``jax.jacfwd``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRU_GATES = ("z", "r", "c")  # order of x[0..2]
LSTM_GATES = ("f", "z", "o")


def paragru_cell(params, h, x):
    """h' = (1 - z) h + z c with diagonal recurrent weights a_z, a_r, a_c; h [d], x [3, d]."""
    z = jax.nn.sigmoid(params["a_z"] * h + x[0])
    r = jax.nn.sigmoid(params["a_r"] * h + x[1])
    c = jnp.tanh(params["a_c"] * (h * r) + x[2])
    return (1.0 - z) * h + z * c


def paragru_jacobian(params, h, x):
    """Diagonal of d h'/d h, [d]."""
    z = jax.nn.sigmoid(params["a_z"] * h + x[0])
    r = jax.nn.sigmoid(params["a_r"] * h + x[1])
    c = jnp.tanh(params["a_c"] * (h * r) + x[2])
    dz = z * (1.0 - z) * params["a_z"]
    dhr = r + h * r * (1.0 - r) * params["a_r"]
    dc = (1.0 - c * c) * params["a_c"] * dhr
    return (1.0 - z) + (c - h) * dz + z * dc


def paralstm_cell(params, s, x):
    """CIFG LSTM with peepholes; state s = [c; h] of shape [2, d], x [3, d] (f, z, o)."""
    c_prev, h = s[0], s[1]
    f = jax.nn.sigmoid(params["a_f"] * h + x[0] + params["p_f"] * c_prev)
    z = jnp.tanh(params["a_z"] * h + x[1])
    c = f * c_prev + (1.0 - f) * z
    o = jax.nn.sigmoid(params["a_o"] * h + x[2] + params["p_o"] * c)
    return jnp.stack([c, o * jnp.tanh(c)])


def paralstm_jacobian(params, s, x):
    """Per-channel 2x2 blocks J[i, j, :] = d s'_i / d s_j (order c, h), [2, 2, d]."""
    c_prev, h = s[0], s[1]
    f = jax.nn.sigmoid(params["a_f"] * h + x[0] + params["p_f"] * c_prev)
    z = jnp.tanh(params["a_z"] * h + x[1])
    c = f * c_prev + (1.0 - f) * z
    o = jax.nn.sigmoid(params["a_o"] * h + x[2] + params["p_o"] * c)
    tc = jnp.tanh(c)
    df = f * (1.0 - f)
    dc_dc = f + (c_prev - z) * df * params["p_f"]
    dc_dh = (c_prev - z) * df * params["a_f"] + (1.0 - f) * (1.0 - z * z) * params["a_z"]
    do = o * (1.0 - o)
    dh_dc = do * params["p_o"] * dc_dc * tc + o * (1.0 - tc * tc) * dc_dc
    dh_dh = do * (params["a_o"] + params["p_o"] * dc_dh) * tc + o * (1.0 - tc * tc) * dc_dh
    return jnp.stack([jnp.stack([dc_dc, dc_dh]), jnp.stack([dh_dc, dh_dh])])


def init_recurrent(key, names, d, fan_in, dtype=jnp.float32, clip=0.5):
    """Diagonal recurrent / peephole weights: truncated normal, std 1/sqrt(fan_in), |w| <= clip."""
    keys = jax.random.split(key, len(names))
    std = 1.0 / fan_in ** 0.5
    return {n: jnp.clip(std * jax.random.truncated_normal(k, -2.0, 2.0, (d,), dtype), -clip, clip)
            for n, k in zip(names, keys)}


def init_paragru(key, d, fan_in=None, dtype=jnp.float32):
    return init_recurrent(key, ("a_z", "a_r", "a_c"), d, fan_in or d, dtype)


def init_paralstm(key, d, fan_in=None, dtype=jnp.float32):
    return init_recurrent(key, ("a_f", "a_z", "a_o", "p_f", "p_o"), d, fan_in or d, dtype)
