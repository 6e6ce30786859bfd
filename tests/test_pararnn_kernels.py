"""ParaRNN solver and scan kernels (issue 4): numerics on CPU, Mosaic/Triton compilation.

Tolerances are the issue's and fixed: Newton (3 iterations) vs sequential, fp32 max-abs <= 5e-6
(ParaGRU, L <= 8192) and <= 2e-5 (ParaLSTM); custom-VJP gradients vs jax.grad through lax.scan,
relative <= 1e-5. Pallas runs interpreted here; its TPU and GPU bodies are also compiled for a real
TPU topology (libtpu) and lowered to Triton for CUDA.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from paxlike.kernels import pararnn as pr
from paxlike.kernels.pararnn import cells, pallas_scan
from paxlike.kernels.pararnn import scan as scan_lib

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _random_scan(kind, batch, length, d, rho=0.8, seed=0):
    """Random recurrence; rho bounds |a| (diagonal) or the spectral norm of each 2x2 block."""
    rng = np.random.default_rng(seed)
    b_shape = (*batch, length, d) if kind == "diagonal" else (*batch, length, 2, d)
    if kind == "diagonal":
        a = rho * rng.uniform(0.0, 1.0, b_shape) * rng.choice([-1.0, 1.0], b_shape)
    else:  # scaled rotations: spectral norm exactly rho * u
        theta = rng.uniform(-np.pi, np.pi, (*batch, length, d))
        u = rho * rng.uniform(0.5, 1.0, (*batch, length, d))
        c, s = u * np.cos(theta), u * np.sin(theta)
        a = np.stack([np.stack([c, -s], -2), np.stack([s, c], -2)], -3)
    b = rng.normal(size=b_shape)
    h0 = rng.normal(size=b_shape[:len(batch)] + b_shape[len(batch) + 1:])
    return a, b, h0


def _loop64(kind, a, b, h0, reverse):
    """fp64 numpy loop over time (batch dims vectorised; time moved to the front for speed)."""
    t_axis = np.ndim(h0) - (1 if kind == "diagonal" else 2)
    a = np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float64), t_axis, 0))
    b = np.ascontiguousarray(np.moveaxis(np.asarray(b, np.float64), t_axis, 0))
    h = np.asarray(h0, np.float64)
    out = np.empty_like(b)
    steps = range(b.shape[0])
    for t in (reversed(steps) if reverse else steps):
        if kind == "diagonal":
            h = a[t] * h + b[t]
        else:
            at = a[t]
            h = np.stack([at[..., 0, 0, :] * h[..., 0, :] + at[..., 0, 1, :] * h[..., 1, :],
                          at[..., 1, 0, :] * h[..., 0, :] + at[..., 1, 1, :] * h[..., 1, :]],
                         axis=-2) + b[t]
        out[t] = h
    return np.moveaxis(out, 0, t_axis)


def _scan_ref(kind, a, b, h0, reverse):
    """lax.scan over time (one batch dim), differentiated by JAX itself: the gradient reference."""
    mv = (lambda m, v: m * v) if kind == "diagonal" else (
        lambda m, v: jnp.einsum("...ijd,...jd->...id", m, v))

    def step(h, ab):
        h = mv(ab[0], h) + ab[1]
        return h, h
    _, hs = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
    return jnp.moveaxis(hs, 0, 1)


def _seq_scan(cell, h0, xs):
    """Reference: plain lax.scan over time of the vmapped cell (differentiated by JAX itself)."""
    def step(h, x):
        h = jax.vmap(cell)(h, x)
        return h, h
    _, hs = lax.scan(step, h0, jnp.moveaxis(xs, 1, 0))
    return jnp.moveaxis(hs, 0, 1)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# ----------------------------------------------------------------------------------------------
# linear scan
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["diagonal", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_all_impls_match_loop_and_associative(kind, reverse):
    a, b, h0 = _random_scan(kind, (2, 3), 100, 40, seed=1)  # 100: not a multiple of any block
    ref = _loop64(kind, a, b, h0, reverse)
    a32, b32, h32 = (jnp.asarray(x, jnp.float32) for x in (a, b, h0))
    # "xla" is lax.associative_scan: the kernel is checked against it and the fp64 loop
    assoc = jax.jit(lambda *z: pr.linear_scan(*z, reverse=reverse, impl="xla"))(a32, b32, h32)
    np.testing.assert_allclose(assoc, ref, atol=2e-5)
    for impl in ["reference", "pallas"]:
        out = jax.jit(lambda *z: pr.linear_scan(*z, reverse=reverse, impl=impl))(a32, b32, h32)
        assert out.shape == b.shape
        np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=impl)
        np.testing.assert_allclose(out, assoc, atol=2e-5, err_msg=impl)
    # both kernel bodies, interpreted, with small tiles so several blocks carry state
    for target, opts in [("tpu", dict(block_t=32, block_d=128)), ("gpu", dict(block_d=16)),
                         ("gpu", dict(block_d=16, chunk=16))]:  # chunked: 3-pass form
        with pallas_scan.target(target, interpret=True):
            out = jax.jit(lambda *z: scan_lib.scan_raw(
                kind, *(x.reshape((6,) + x.shape[2:]) for x in z), reverse=reverse,
                impl="pallas", **opts))(a32, b32, h32)
        np.testing.assert_allclose(out.reshape(ref.shape), ref, atol=2e-5, err_msg=target)


def _near_unit(kind, length, d, seed):
    a, b, h0 = _random_scan(kind, (1,), length, d, seed=seed)
    rng = np.random.default_rng(seed + 1)
    mod = 1.0 - 10.0 ** rng.uniform(-7, -3, (1, length, d))  # |a| (or block norm) in [1-1e-3, 1)
    if kind == "diagonal":
        a = np.sign(a) * mod
    else:
        a = a / np.linalg.norm(a[..., 0, :], axis=-2)[..., None, None, :] * mod[..., None, None, :]
    return a, 1e-2 * b, h0


@pytest.mark.parametrize("kind", ["diagonal", "block2"])
def test_linear_scan_near_unit_modulus_long(kind):
    """|a| -> 1 over L = 2^17: the Pallas kernel as used on CPU (interpreted GPU body) and lax.scan
    vs an fp64 loop, plus lax.associative_scan (diagonal; for 2x2 it is checked at 2^12 to save
    compile time). The TPU body runs forward at L = 2^12: interpreted, it takes minutes at 2^17 on
    2 cores (its reverse form is checked above; it is compiled for a real TPU below)."""
    for length, target, opts in [(2 ** 17, "gpu", {}), (2 ** 12, "tpu", dict(block_t=256))]:
        a, b, h0 = _near_unit(kind, length, 8, seed=2)
        for reverse in [False, True] if target == "gpu" else [False]:
            ref = _loop64(kind, a, b, h0, reverse)
            scale = np.max(np.abs(ref))
            a32, b32, h32 = (jnp.asarray(x, jnp.float32) for x in (a, b, h0))
            with pallas_scan.target(target, interpret=True):
                outs = {target: jax.jit(lambda *z: scan_lib.scan_raw(
                    kind, *z, reverse=reverse, impl="pallas", **opts))(a32, b32, h32)}
            if not reverse and (length == 2 ** 17) == (kind == "diagonal"):  # compile time: doc
                outs["assoc"] = jax.jit(lambda *z: pr.linear_scan(*z, impl="xla"))(
                    a32, b32, h32)
                outs["reference"] = pr.linear_scan(a32, b32, h32, reverse=reverse,
                                                   impl="reference")
            for name, out in outs.items():
                # fp32 rounding accumulates over near-neutral steps: 1e-4 of the state scale
                err = float(np.max(np.abs(np.asarray(out) - ref)))
                assert err <= 1e-4 * scale, (name, reverse, err, scale)


@pytest.mark.parametrize("kind", ["diagonal", "block2"])
@pytest.mark.parametrize("impl", ["pallas"])  # the VJP rule is impl-agnostic; pallas needs it
def test_linear_scan_gradients(kind, impl):
    a, b, h0 = (jnp.asarray(x, jnp.float32) for x in _random_scan(kind, (2,), 50, 12, seed=4))
    w = jnp.asarray(RNG.normal(size=b.shape), jnp.float32)
    for reverse in [False, True]:
        loss = lambda a, b, h0, impl: jnp.sum(w * pr.linear_scan(  # noqa: E731
            a, b, h0, reverse=reverse, impl=impl))
        ref = jax.jit(jax.grad(lambda *z: jnp.sum(w * _scan_ref(kind, *z, reverse)),
                               argnums=(0, 1, 2)))(a, b, h0)
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(a, b, h0, impl)
        for g, r in zip(got, ref):
            assert _rel(g, r) <= 1e-5


# ----------------------------------------------------------------------------------------------
# cells and Jacobians
# ----------------------------------------------------------------------------------------------
def test_cell_jacobians_match_jacfwd():
    d = 64
    key = jax.random.PRNGKey(0)
    gp, lp = cells.init_paragru(key, d, fan_in=1), cells.init_paralstm(key, d, fan_in=1)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, d))
    h = 0.8 * jax.random.normal(jax.random.PRNGKey(2), (d,))
    s = 0.8 * jax.random.normal(jax.random.PRNGKey(3), (2, d))
    cfg = lambda cell, kind: pr.solver._Config(  # noqa: E731
        cell=cell, jac=None, kind=kind, iterations=1, tol=None, threshold=1.0,
        impl="xla", fallback=None, fallback_iterations=1, warn=False, with_residual=False)
    gcell = lambda h, x: cells.paragru_cell(gp, h, x)  # noqa: E731
    full = jax.jit(jax.jacfwd(gcell))(h, x)
    assert float(jnp.max(jnp.abs(full - jnp.diag(jnp.diag(full))))) == 0.0  # truly diagonal
    one = lambda c, h, x: jax.jit(lambda h, x: pr.solver._one_jacobian(c, [], [], h, x)[1])(h, x)  # noqa: E731,E501
    auto = one(cfg(gcell, "diagonal"), h, x)
    np.testing.assert_allclose(auto, jnp.diag(full), atol=1e-6)
    np.testing.assert_allclose(cells.paragru_jacobian(gp, h, x), jnp.diag(full), atol=1e-6)
    dense = one(cfg(gcell, "dense"), h, x)
    np.testing.assert_allclose(dense, full, atol=1e-6)

    lcell = lambda s, x: cells.paralstm_cell(lp, s, x)  # noqa: E731
    full = jax.jit(jax.jacfwd(lcell))(s, x)  # [2, d, 2, d]
    blocks = jnp.einsum("icjc->ijc", full)  # per-channel 2x2 blocks
    off = full - jnp.einsum("ijc,cd->icjd", blocks, jnp.eye(d))
    assert float(jnp.max(jnp.abs(off))) == 0.0  # truly per-channel 2x2
    auto = one(cfg(lcell, "block2"), s, x)
    np.testing.assert_allclose(auto, blocks, atol=1e-6)
    np.testing.assert_allclose(cells.paralstm_jacobian(lp, s, x), blocks, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Newton solver vs the sequential scan
# ----------------------------------------------------------------------------------------------
def _gru_problem(batch, length, d, fan_in, seed=0):
    p = cells.init_paragru(jax.random.PRNGKey(seed), d, fan_in=fan_in)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, length, 3, d))
    h0 = 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 2), (batch, d))
    return p, x, h0


def _lstm_problem(batch, length, d, fan_in, seed=0):
    p = cells.init_paralstm(jax.random.PRNGKey(seed), d, fan_in=fan_in)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, length, 3, d))
    s0 = 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 2), (batch, 2, d))
    return p, x, s0


@pytest.mark.parametrize("length,impl,fan_in", [
    (512, "xla", 1), (512, "pallas", 1), (8192, "pallas", 1), (8192, "pallas", 256)])
def test_newton_paragru_matches_sequential(length, impl, fan_in):
    # fan_in=1 puts |a| at the 0.5 clip (the hardest allowed recurrence); 256 is the init for d=256
    p, x, h0 = _gru_problem(2, length, 256, fan_in)
    cell = lambda h, x: cells.paragru_cell(p, h, x)  # noqa: E731
    ref = jax.jit(lambda h0, x: _seq_scan(cell, h0, x))(h0, x)
    hs, info = jax.jit(lambda h0, x: pr.solve(cell, h0, x, impl=impl, return_info=True))(h0, x)
    assert float(jnp.max(jnp.abs(hs - ref))) <= 5e-6
    assert bool(info["converged"]) and info["residuals"].shape == (3,)
    assert float(info["residuals"][2]) < float(info["residuals"][1]) < float(info["residuals"][0])


@pytest.mark.parametrize("length,fan_in", [(512, 1), (8192, 256)])
def test_newton_paralstm_matches_sequential(length, fan_in):
    p, x, s0 = _lstm_problem(2, length, 256, fan_in)
    cell = lambda s, x: cells.paralstm_cell(p, s, x)  # noqa: E731
    ref = jax.jit(lambda s0, x: _seq_scan(cell, s0, x))(s0, x)
    hs = jax.jit(lambda s0, x: pr.solve(cell, s0, x, jacobian="block2", impl="pallas"))(s0, x)
    assert hs.shape == (2, length, 2, 256)
    assert float(jnp.max(jnp.abs(hs - ref))) <= 2e-5


def test_linear_cell_exact_after_one_iteration():
    d = 32
    a = jnp.asarray(RNG.uniform(-0.99, 0.99, d), jnp.float32)
    x = jnp.asarray(RNG.normal(size=(3, 200, d)), jnp.float32)
    h0 = jnp.asarray(RNG.normal(size=(3, d)), jnp.float32)
    cell = lambda h, x: a * h + jnp.sin(x)  # noqa: E731  (nonlinear in x only)
    ref = _seq_scan(cell, h0, x)
    scale = float(jnp.max(jnp.abs(ref)))  # exact up to fp32 rounding: relative 1e-6
    for impl in ["xla", "pallas"]:
        hs, info = jax.jit(lambda h0, x: pr.solve(cell, h0, x, iterations=1, impl=impl,
                                                  return_info=True))(h0, x)
        assert float(jnp.max(jnp.abs(hs - ref))) <= 1e-6 * scale
        assert float(info["final_residual"]) <= 1e-6 * scale
    m = jnp.asarray(RNG.uniform(-0.6, 0.6, (2, 2, d)), jnp.float32)  # 2x2 blocks
    cell2 = lambda s, x: jnp.einsum("ijd,jd->id", m, s) + jnp.stack([x, jnp.cos(x)])  # noqa: E731,E501
    s0 = jnp.zeros((3, 2, d))
    hs = jax.jit(lambda s0, x: pr.solve(cell2, s0, x, jacobian="block2", iterations=1,
                                        impl="pallas"))(s0, x)
    np.testing.assert_allclose(hs, _seq_scan(cell2, s0, x), atol=2e-6)


def test_dense_jacobian_newton_and_gradients():
    """A cell with a full (small) recurrent matrix: dense Jacobians, Newton + associative scan."""
    d = 6
    w = jnp.asarray(RNG.normal(size=(d, d)) * 0.3, jnp.float32)
    x = jnp.asarray(RNG.normal(size=(2, 64, d)), jnp.float32)
    h0 = jnp.asarray(RNG.normal(size=(2, d)), jnp.float32)

    def loss(w, x, h0, impl):
        hs = pr.solve(lambda h, xx: jnp.tanh(w @ h + xx), h0, x, jacobian="dense", impl=impl)
        return jnp.sum(jnp.sin(hs))
    ref_fn = lambda w, x, h0: jnp.sum(jnp.sin(_seq_scan(lambda h, xx: jnp.tanh(w @ h + xx), h0, x)))  # noqa: E731,E501
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    val, g = grad(w, x, h0, "xla")
    ref_val, ref_g = jax.jit(jax.value_and_grad(ref_fn, argnums=(0, 1, 2)))(w, x, h0)
    assert abs(float(val - ref_val)) <= 1e-4
    for a, b in zip(g, ref_g):
        assert _rel(a, b) <= 1e-5


# ----------------------------------------------------------------------------------------------
# gradients (custom VJP through the adjoint) vs jax.grad through lax.scan
# ----------------------------------------------------------------------------------------------
def _cell_problem(model, length, d):
    """(params, x, h0, cell step, solve kwargs) of a strongly recurrent GRU or LSTM, batch 2."""
    if model == "gru":
        return (*_gru_problem(2, length, d, fan_in=1, seed=3), cells.paragru_cell, {})
    return (*_lstm_problem(2, length, d, fan_in=1, seed=3), cells.paralstm_cell,
            {"jacobian": "block2"})


@pytest.mark.parametrize("model,impl", [
    ("gru", "reference"), ("gru", "xla"), ("gru", "pallas"), ("lstm", "pallas")])
def test_gradients_match_sequential_autodiff(model, impl):
    length, d = 256, 32
    p, x, h0, step, kw = _cell_problem(model, length, d)
    w = jax.random.normal(jax.random.PRNGKey(9), (2, length) + h0.shape[1:])

    def loss(p, x, h0, solver):  # the cell closes over p: grads go through closure_convert
        cell = lambda h, xx: step(p, h, xx)  # noqa: E731
        return jnp.sum(w * jnp.tanh(solver(cell, h0, x)))

    ref = jax.jit(jax.grad(lambda *z: loss(*z, _seq_scan), argnums=(0, 1, 2)))(p, x, h0)
    got = jax.jit(jax.grad(lambda *z: loss(*z, lambda c, h, x: pr.solve(
        c, h, x, impl=impl, **kw)), argnums=(0, 1, 2)))(p, x, h0)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert _rel(g, r) <= 1e-5


@pytest.mark.parametrize("model,impl,axes", [
    ("gru", "reference", (4,)), ("gru", "xla", (4,)), ("lstm", "xla", (2, 2))])
def test_sequence_split_over_devices_equals_one_device(model, impl, axes):
    """solve(axis_name=...) inside shard_map, each device one block of the sequence (blocks
    passing states, Newton corrections and adjoints on; impl "reference" relays its lax.scan):
    the states and the gradients for parameters, inputs and h0 equal the unsplit solve. Two
    mesh axes: the blocks follow their linear index."""
    from jax.sharding import Mesh, PartitionSpec as P
    length, d = 64, 16
    p, x, h0, step, kw = _cell_problem(model, length, d)
    w = jax.random.normal(jax.random.PRNGKey(9), (2, length) + h0.shape[1:])
    names = ("outer", "inner")[-len(axes):]
    mesh = Mesh(np.array(jax.devices()[:int(np.prod(axes))]).reshape(axes), names)

    def solve(p, x, h0, **split):
        return pr.solve(lambda h, xx: step(p, h, xx), h0, x, impl=impl, **kw, **split)

    split = jax.shard_map(lambda p, x, h0: solve(p, x, h0, axis_name=names), mesh=mesh,
                          in_specs=(P(), P(None, names), P()), out_specs=P(None, names),
                          check_vma=False)
    loss = lambda f: lambda p, x, h0: jnp.sum(w * jnp.tanh(f(p, x, h0)))  # noqa: E731
    ref = jax.jit(jax.value_and_grad(loss(solve), argnums=(0, 1, 2)))(p, x, h0)
    got = jax.jit(jax.value_and_grad(loss(split), argnums=(0, 1, 2)))(p, x, h0)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
        assert _rel(g, r) <= 1e-5


def test_analytic_jacobian_and_pytree_inputs_and_batch_dims():
    p, x, h0 = _gru_problem(4, 64, 16, fan_in=1)
    x = x.reshape(2, 2, 64, 3, 16)  # two leading batch dims
    h0 = h0.reshape(2, 2, 16)
    xs = {"z": x[..., 0, :], "rc": x[..., 1:, :]}  # a pytree of inputs
    cell = lambda h, xx: cells.paragru_cell(p, h, jnp.concatenate([xx["z"][None], xx["rc"]]))  # noqa: E731,E501
    jac = lambda h, xx: cells.paragru_jacobian(p, h, jnp.concatenate([xx["z"][None], xx["rc"]]))  # noqa: E731,E501
    seq = pr.solve(cell, h0, xs, impl="reference")
    assert seq.shape == (2, 2, 64, 16)
    hs = jax.jit(lambda h0, xs: pr.solve(cell, h0, xs, impl="pallas", jacobian_fn=jac))(h0, xs)
    np.testing.assert_allclose(hs, seq, atol=5e-6)

    def loss(p, h0, use_jac):
        c = lambda h, xx: cells.paragru_cell(p, h, jnp.concatenate([xx["z"][None], xx["rc"]]))  # noqa: E731,E501
        j = lambda h, xx: cells.paragru_jacobian(p, h, jnp.concatenate([xx["z"][None], xx["rc"]]))  # noqa: E731,E501
        return jnp.sum(jnp.sin(pr.solve(c, h0, xs, impl="pallas",
                                        jacobian_fn=j if use_jac else None)))
    g1 = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(p, h0, True)
    g2 = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(p, h0, False)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert _rel(a, b) <= 1e-5


# ----------------------------------------------------------------------------------------------
# convergence reporting and fallbacks
# ----------------------------------------------------------------------------------------------
def _run_reporting(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
        jax.block_until_ready(out)
        jax.effects_barrier()  # the report is a debug callback from the device program
    return out, [w for w in caught if issubclass(w.category, pr.ConvergenceWarning)]


def test_divergent_cell_is_reported_and_fallbacks_recover():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 512, 16))
    h0 = jnp.zeros((2, 16))
    cell = lambda h, x: jnp.tanh(1.5 * h + x)  # noqa: E731  (|df/dh| up to 1.5: Newton overshoots)
    ref = _seq_scan(cell, h0, x)
    solve = jax.jit(lambda h0, x, fb: pr.solve(cell, h0, x, impl="pallas", return_info=True,
                                               fallback=fb), static_argnums=2)
    (hs, info), warned = _run_reporting(lambda: solve(h0, x, None))
    assert not bool(info["converged"]) and float(info["final_residual"]) > 1e-4
    assert len(warned) == 1 and "not a converged solution" in str(warned[0].message)
    assert float(jnp.max(jnp.abs(hs - ref))) > 1e-2  # the answer really is wrong: reported
    for fb in ["reference", "damped"]:
        (hs, info), warned = _run_reporting(lambda: solve(h0, x, fb))
        assert bool(info["converged"]) and bool(info["fallback_used"]) and not warned, fb
        assert float(jnp.max(jnp.abs(hs - ref))) <= 1e-4, fb

    # bistable and expansive (|df/dh| up to 3): damping does not rescue it -> still reported
    hard = lambda h, x: jnp.tanh(3.0 * h + x)  # noqa: E731
    (hs, info), warned = _run_reporting(lambda: pr.solve(hard, h0, x, impl="pallas",
                                                         fallback="damped", return_info=True))
    assert not bool(info["converged"]) and len(warned) == 1
    assert "even after the fallback" in str(warned[0].message)
    # non-finite iterates are never reported as converged
    nan_cell = lambda h, x: h * jnp.nan + x  # noqa: E731
    (_, info), warned = _run_reporting(lambda: pr.solve(nan_cell, h0, x, impl="pallas",
                                                        return_info=True))
    assert not bool(info["converged"]) and float(info["final_residual"]) == np.inf and warned


def test_tolerance_stops_early():
    p, x, h0 = _gru_problem(2, 256, 32, fan_in=256)
    cell = lambda h, x: cells.paragru_cell(p, h, x)  # noqa: E731
    hs, info = pr.solve(cell, h0, x, iterations=10, tol=1e-6, impl="pallas", return_info=True)
    k = int(info["iterations"])
    assert 1 <= k < 10 and bool(info["converged"]) and float(info["final_residual"]) <= 1e-6
    np.testing.assert_array_equal(info["residuals"][k - 1:], info["final_residual"])
    np.testing.assert_allclose(hs, _seq_scan(cell, h0, x), atol=5e-6)


def test_bad_arguments_raise_value_errors():
    cell = lambda h, x: jnp.tanh(h + x)  # noqa: E731
    h0, x = jnp.zeros((2, 8)), jnp.zeros((2, 16, 8))
    bad = [
        dict(jacobian="full"), dict(impl="cuda"), dict(iterations=0), dict(iterations=2.0),
        dict(tol=-1.0), dict(fallback="retry"), dict(jacobian="block2"),
        dict(jacobian="dense", impl="pallas"),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            pr.solve(cell, h0, x, **kw)
    with pytest.raises(ValueError):
        pr.solve(cell, jnp.zeros((3, 8)), x)  # batch mismatch
    with pytest.raises(ValueError):
        pr.solve(cell, jnp.zeros((2, 8), jnp.int32), x)
    with pytest.raises(ValueError):
        pr.solve(lambda h, x: jnp.concatenate([h, x]), h0, x)  # wrong output shape
    with pytest.raises(ValueError):
        pr.solve(cell, h0, {"a": x, "b": jnp.zeros((2, 15, 8))})  # lengths disagree
    with pytest.raises(ValueError):
        pr.linear_scan(jnp.zeros((2, 16, 8)), jnp.zeros((2, 16, 4)))
    with pytest.raises(ValueError):
        pr.linear_scan(jnp.zeros((2, 16, 8)), jnp.zeros((2, 16, 8)), jnp.zeros((3, 8)))
    with pytest.raises(ValueError):
        pr.linear_scan(jnp.zeros((2, 16, 8)), jnp.zeros((2, 16, 8)), impl="fast")
    with pytest.raises(ValueError, match=r"axis_name='context'.*inside a jax.shard_map"):
        pr.solve(cell, h0, x, axis_name="context")   # no enclosing shard_map


def test_auto_is_reference_on_cpu():
    """The measured choice on CPU (docs/pararnn.md): the reference lax.scan wins at every shape."""
    assert jax.default_backend() == "cpu"
    for kind in ["diagonal", "block2", "dense"]:
        assert pr.choose_impl("auto", kind=kind, batch=8, length=32768, width=1024) == "reference"


# ----------------------------------------------------------------------------------------------
# real compilers: Mosaic (TPU topology from libtpu) and Triton (CUDA export)
# ----------------------------------------------------------------------------------------------
def _solve_grad_program(kind, dtype, warn=True):
    """fwd + bwd of a ParaRNN layer: every Pallas configuration the solver uses (the forward
    scan inside Newton, the reverse adjoint scan), in the given dtype."""
    step, jac = (cells.paragru_cell, "diagonal") if kind == "diagonal" else (
        cells.paralstm_cell, "block2")

    def loss(p, x, h0):
        hs = pr.solve(lambda h, xx: step(p, h, xx), h0, x, jacobian=jac, impl="pallas",
                      warn=warn)
        return jnp.sum(hs.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))


def _abstract_args(kind, dtype, sharding=None):
    b, length, d = 8, 1000, 200  # deliberately not multiples of the tiles: exercises padding
    names = ("a_z", "a_r", "a_c") if kind == "diagonal" else ("a_f", "a_z", "a_o", "p_f", "p_o")
    sds = lambda *s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding)  # noqa: E731
    state = (d,) if kind == "diagonal" else (2, d)
    return {n: sds(d) for n in names}, sds(b, length, 3, d), sds(b, *state)


def _scan_program(kind, reverse):
    def f(a, b, h0):
        return pr.linear_scan(a, b, h0, reverse=reverse, impl="pallas")
    return f


def _scan_args(kind, sharding=None, dtype=jnp.float32):
    b, length, d = 4, 777, 300  # GPU: L > 512 takes the chunked 3-pass path
    sds = lambda *s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding)  # noqa: E731
    if kind == "diagonal":
        return sds(b, length, d), sds(b, length, d), sds(b, d)
    return sds(b, length, 2, 2, d), sds(b, length, 2, d), sds(b, 2, d)


@pytest.fixture(scope="module")
def tpu_sharding():
    import os
    pytest.importorskip("libtpu")          # the `tpu` extra; with it installed this must pass
    from jax.experimental import topologies
    # Other processes on the machine may hold libtpu's lock file; AOT compilation needs no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def test_tpu_mosaic_compiles_every_configuration(tpu_sharding):
    """Every kernel configuration (structure x direction in fp32, plus bf16 forward) through Mosaic
    for a v5e chip, and the whole ParaGRU fwd+bwd program. (The ParaLSTM fwd+bwd program uses the same block2
    kernels; its full-program TPU compile takes 20-40 s here, so it is left out.)"""
    with pallas_scan.target("tpu"):
        for kind in ["diagonal", "block2"]:
            for reverse in [False, True]:
                for dtype in [jnp.float32] + ([jnp.bfloat16] if not reverse else []):
                    c = jax.jit(_scan_program(kind, reverse)).lower(
                        *_scan_args(kind, tpu_sharding, dtype)).compile()
                    assert "tpu_custom_call" in c.as_text()
        c = jax.jit(_solve_grad_program("diagonal", jnp.float32)).lower(
            *_abstract_args("diagonal", jnp.float32, tpu_sharding)).compile()
        assert c.as_text().count("tpu_custom_call") >= 2  # Newton forward scan + adjoint scan


def test_cuda_triton_lowering_of_every_configuration():
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    export = lambda f, *args: jax.export.export(  # noqa: E731
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args).mlir_module()
    with pallas_scan.target("gpu"), jax.sharding.use_abstract_mesh(mesh):
        for kind in ["diagonal", "block2"]:
            for reverse in [False, True]:
                for dtype in [jnp.float32, jnp.bfloat16]:
                    text = export(_scan_program(kind, reverse), *_scan_args(kind, None, dtype))
                    assert text.count("__gpu$xla.gpu.triton") == 3  # aggregate, chunks, re-walk
            for dtype in [jnp.float32, jnp.bfloat16]:
                # warn=False: the convergence report is a host callback, which cannot be
                # lowered for CUDA on a host without a GPU backend
                text = export(_solve_grad_program(kind, dtype, warn=False),
                              *_abstract_args(kind, dtype))
                assert text.count("__gpu$xla.gpu.triton") >= 2
