"""MoE dispatch kernels (paxlike.kernels.moe): every path against the dense oracle.

fp32 throughout; outputs and gradients (w.r.t. x, the router weights `combine` and all expert
weights, of loss = sum(y * cotangent)) within the fixed tolerance atol = rtol = 1e-5.
Shapes are tiny (64 tokens, d 16, f 32, 8 experts, top-2) and each path is jitted once per
module, so the file is dominated by a dozen small compiles. Expert parallelism runs on the 8
emulated CPU devices of conftest.py with the padded exchange; the real ragged all-to-all and the
Mosaic grouped matmul are compiled for a TPU topology from this CPU host (libtpu, no TPU).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from paxlike.kernels.moe import grouped as grouped_module
from paxlike.kernels.moe import (ExpertWeights, capacity, capacity_ffn, capacity_slots,
                                 dropless_ffn, expert_parallel_ffn, grouped_matmul,
                                 padded_ragged_all_to_all, reference_ffn)

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TOL = dict(atol=1e-5, rtol=1e-5)
N, D, F, E, K = 64, 16, 32, 8, 2


def close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **TOL)


def weights(rng, e=E, d=D, f=F):
    return ExpertWeights(*(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
                           for s in ((e, d, f), (e, d, f), (e, f, d))))


def distinct_routing(rng, n=N, e=E, k=K):
    """k distinct experts per token, uniformly at random."""
    return np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)


def skewed_routing(rng, n=N, e=E, k=K):
    """k distinct experts per token, drawn with weights 2^-i: experts 0 and 1 are overloaded."""
    p = 0.5 ** np.arange(e)
    return np.stack([rng.choice(e, k, replace=False, p=p / p.sum()) for _ in range(n)]
                    ).astype(np.int32)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    return dict(x=jnp.asarray(rng.standard_normal((N, D)), jnp.float32), w=weights(rng),
                ids=jnp.asarray(distinct_routing(rng)),
                skewed=jnp.asarray(skewed_routing(rng)),
                combine=jnp.asarray(rng.uniform(0.1, 1.0, (N, K)), jnp.float32),
                cot=jnp.asarray(rng.standard_normal((N, D)), jnp.float32))


def value_and_grads(ffn):
    """jit of (x, w, ids, combine, cot) -> (y, (dx, dw, dcombine)) for loss = sum(y * cot)."""
    def loss(x, w, combine, ids, cot):
        y = ffn(x, w, ids, combine)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    @jax.jit
    def run(x, w, ids, combine, cot):
        (_, y), g = grads(x, w, combine, ids, cot)
        return y, g
    return run


@pytest.fixture(scope="module")
def reference(problem):
    p = problem
    return value_and_grads(reference_ffn)(p["x"], p["w"], p["ids"], p["combine"], p["cot"])


# ----------------------------------------------------------------------------- single device
def test_capacity_formula():
    assert capacity(64, 2, 8, 1.25) == 20
    assert capacity(10, 1, 3, 1.0) == 4        # ceil(3.33)
    assert capacity(64, 2, 8, 4.0) == 64
    with pytest.raises(ValueError):
        capacity(64, 2, 8, 0.0)


def test_dropless_paths_match_reference(problem, reference):
    """A capacity no expert can fill (= N: k distinct experts per token), the grouped-matmul
    dropless path with ragged_dot: the oracle's outputs and gradients."""
    p = problem
    args = (p["x"], p["w"], p["ids"], p["combine"], p["cot"])
    big = capacity(N, K, E, E / K)
    assert big == N
    kept = jax.jit(capacity_ffn, static_argnums=4)(*args[:4], big)[1]
    assert bool(kept.all())
    close(value_and_grads(lambda *a: capacity_ffn(*a, big)[0])(*args), reference)
    close(value_and_grads(functools.partial(dropless_ffn, impl="xla"))(*args), reference)


def _simulate_capacity(ids: np.ndarray, num_experts: int, cap: int):
    """The drop rule in plain Python: walk the routing in position order (row-major)."""
    filled = [0] * num_experts
    slot, kept = np.zeros(ids.shape, int), np.zeros(ids.shape, bool)
    for n in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[n, j]
            slot[n, j], kept[n, j] = filled[e], filled[e] < cap
            filled[e] += 1
    return slot, kept


@pytest.mark.parametrize("seed", [1, 2])
def test_capacity_slots_follow_position_order(seed):
    rng = np.random.default_rng(seed)
    ids = skewed_routing(rng, n=50, k=3)
    slots = jax.jit(capacity_slots, static_argnums=(1, 2))
    for cap in (1, 4, 13, 50):
        slot, kept = slots(jnp.asarray(ids), E, cap)
        want_slot, want_kept = _simulate_capacity(ids, E, cap)
        np.testing.assert_array_equal(np.asarray(kept), want_kept)
        np.testing.assert_array_equal(np.asarray(slot), want_slot)
        if cap < 50:
            assert 0 < want_kept.sum() < want_kept.size     # the skew makes drops happen


def test_capacity_ffn_drops_like_masked_reference(problem):
    """With drops, capacity_ffn == the oracle with the router weights of dropped assignments
    zeroed, in outputs and in every gradient (dropped assignments get zero combine gradient)."""
    p = problem
    ids = p["skewed"]
    cap = capacity(N, K, E, 1.0)                                   # 16 slots per expert
    y, kept = jax.jit(capacity_ffn, static_argnums=4)(p["x"], p["w"], ids, p["combine"], cap)
    _, want_kept = _simulate_capacity(np.asarray(ids), E, cap)
    np.testing.assert_array_equal(np.asarray(kept), want_kept)
    assert 0 < want_kept.sum() < want_kept.size
    masked = lambda x, w, i, c: reference_ffn(x, w, i, c * kept)
    args = (p["x"], p["w"], ids, p["combine"], p["cot"])
    got = value_and_grads(lambda *a: capacity_ffn(*a, cap)[0])(*args)
    close(got, value_and_grads(masked)(*args))
    np.testing.assert_array_equal(np.asarray(got[1][2])[~want_kept], 0.0)


def test_capacity_ffn_constrain_hook_sees_expert_buffers(problem):
    p = problem
    seen = []

    def hook(a):
        seen.append(a.shape)
        return a
    capacity_ffn(p["x"], p["w"], p["ids"], p["combine"], 5, constrain_buffer=hook)
    assert seen == [(1, E, 5, D), (1, E, 5, D)]


def test_grouped_capacity_is_each_group_on_its_own(problem):
    """[G, N, d] inputs: every group has its own capacity and position order, exactly as if each
    group were dispatched alone (GShard's groups)."""
    p = problem
    groups = 4
    split = lambda a: a.reshape(groups, N // groups, *a.shape[1:])
    cap = capacity(N // groups, K, E, 1.0)
    args = (split(p["x"]), p["w"], split(p["skewed"]), split(p["combine"]))
    y, kept = jax.jit(capacity_ffn, static_argnums=4)(*args, cap)
    for g in range(groups):
        y_g, kept_g = capacity_ffn(args[0][g], p["w"], args[2][g], args[3][g], cap)
        np.testing.assert_array_equal(np.asarray(kept[g]), np.asarray(kept_g))
        np.testing.assert_allclose(np.asarray(y[g]), np.asarray(y_g), rtol=1e-6, atol=1e-6)
    assert 0 < int(kept.sum()) < kept.size


def test_grouped_matmul_pallas_matches_ragged_dot(monkeypatch):
    """Megablox (interpreted) vs ragged_dot vs a NumPy loop over groups, forward and gradients,
    with empty groups at the start, middle and end and 11 rows past the last group. Those rows
    hold NaN: they must come out zero with zero gradient (megablox leaves them uninitialised)."""
    rng = np.random.default_rng(3)
    sizes = np.array([0, 7, 0, 12, 9, 0], np.int32)
    m, total = 39, int(sizes.sum())
    lhs = rng.standard_normal((m, D)).astype(np.float32)
    lhs[total:] = np.nan
    rhs = rng.standard_normal((len(sizes), D, F)).astype(np.float32)
    cot = rng.standard_normal((m, F)).astype(np.float32)

    def run(impl):
        def loss(a, b):
            out = grouped_matmul(a, b, jnp.asarray(sizes), impl=impl)
            return jnp.sum(out * cot), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(lhs, rhs)
        return out, grads

    want = np.zeros((m, F), np.float32)
    group = np.repeat(np.arange(len(sizes)), sizes)
    for r in range(total):
        want[r] = lhs[r] @ rhs[group[r]]
    xla, ragged, pallas = run("xla"), run("ragged_dot"), run("pallas")
    np.testing.assert_allclose(np.asarray(xla[0]), want, **TOL)
    close(ragged, xla)
    close(pallas, xla)
    # Tiles of 4 rows: groups span several tiles and end in partial ones.
    monkeypatch.setattr(grouped_module, "XLA_TILE", 4)
    close(run("xla"), xla)
    for out, (dlhs, drhs) in (xla, pallas):
        assert np.all(np.asarray(out)[total:] == 0) and np.all(np.asarray(dlhs)[total:] == 0)
        assert np.all(np.isfinite(np.asarray(drhs)))


def test_dropless_pallas_matches_reference(problem, reference):
    p = problem
    args = (p["x"], p["w"], p["ids"], p["combine"], p["cot"])
    close(value_and_grads(functools.partial(dropless_ffn, impl="pallas"))(*args), reference)


# ------------------------------------------------------------------------ expert parallelism
def cpu_mesh(shape, names):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))


# name: (mesh shape, axis names, token layout [N] or [B, T], token_spec, ep_axes,
#        replicated_ep_axes, reduce_axes)
EP_CASES = {
    # 8-way EP, one expert per device, tokens split over the expert axis.
    "expert8": ((8,), ("expert",), (N,), P("expert"), "expert", (), ()),
    # 4-way EP; [B, T] tokens split over data (B) and expert (T): weights replicated over data.
    "data2_expert4": ((2, 4), ("data", "expert"), (4, N // 4), P("data", "expert"), "expert",
                      (), ()),
    # Tensor-parallel experts: f split 2-way over `tensor`, outputs psum-ed there.
    "expert4_tensor2": ((4, 2), ("expert", "tensor"), (N,), P("expert"), "expert", (),
                        ("tensor",)),
    # Parallel folding: EP over (expert, tensor) = 4 devices with tokens replicated over
    # `tensor`, each device taking half; a whole-x token_spec as the model passes it.
    "folded": ((2, 2, 2), ("data", "expert", "tensor"), (2, N // 2), P("data", "expert", None),
               ("expert", "tensor"), ("tensor",), ()),
}


def ep_ffn(name, **kw):
    shape, names, lead, spec, ep, rep, red = EP_CASES[name]
    mesh = cpu_mesh(shape, names)

    def ffn(x, w, ids, combine):
        y = expert_parallel_ffn(x.reshape(*lead, D), w, ids.reshape(*lead, K),
                                combine.reshape(*lead, K), mesh=mesh, token_spec=spec,
                                ep_axes=ep, replicated_ep_axes=rep, reduce_axes=red, **kw)
        assert y.shape == (*lead, D)
        return y.reshape(N, D)
    return ffn


@pytest.mark.parametrize("name", sorted(EP_CASES))
def test_expert_parallel_matches_reference(problem, reference, name):
    p = problem
    got = value_and_grads(ep_ffn(name))(p["x"], p["w"], p["ids"], p["combine"], p["cot"])
    close(got, reference)


def test_expert_parallel_skewed_routing(problem):
    """Every token picks experts 0 and 1, both on EP device 0, which so receives n*k*P rows:
    its worst-case receive buffer exactly full."""
    p = problem
    ids = jnp.asarray(np.stack([np.zeros(N), np.ones(N)], 1).astype(np.int32))   # experts 0, 1
    args = (p["x"], p["w"], ids, p["combine"], p["cot"])
    close(value_and_grads(ep_ffn("expert4_tensor2"))(*args), value_and_grads(reference_ffn)(*args))


def test_nan_padding_changes_nothing(problem):
    """pad_value = NaN fills every padding slot of both exchanges and the initial receive
    buffers; outputs and gradients are bitwise those of pad_value = 0, and finite. With the
    megablox grouped matmul (interpreted), which itself leaves NaN in rows it does not own."""
    p = problem
    args = (p["x"], p["w"], p["skewed"], p["combine"], p["cot"])
    zero = value_and_grads(ep_ffn("folded", gmm_impl="pallas"))(*args)
    nan = value_and_grads(ep_ffn("folded", gmm_impl="pallas", pad_value=float("nan")))(*args)
    for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(nan), strict=True):
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    close(zero, value_and_grads(reference_ffn)(*args))


def test_expert_parallel_rejects_inconsistent_sharding(problem):
    p = problem
    mesh = cpu_mesh((4, 2), ("expert", "tensor"))
    common = dict(mesh=mesh, token_spec=P("expert"), ep_axes="expert")
    with pytest.raises(ValueError, match="reduce_axes"):      # f split but no psum requested
        expert_parallel_ffn(p["x"], p["w"], p["ids"], p["combine"], **common, weight_specs=
                            ExpertWeights(P("expert", None, "tensor"), P("expert", None, "tensor"),
                                          P("expert", "tensor", None)))
    with pytest.raises(ValueError, match="replicated"):       # tokens split over the reduce axis
        expert_parallel_ffn(p["x"], p["w"], p["ids"], p["combine"], mesh=mesh,
                            token_spec=P(("expert", "tensor")), ep_axes="expert",
                            reduce_axes="tensor")


def _ragged_all_to_all_numpy(operand, output, in_off, send, out_off, num_devices):
    """ragged_all_to_all semantics, per device p: slice i of p (slices_per_device = K / n)
    goes to device i // slices_per_device at p's output_offsets[i]."""
    per = in_off.shape[1] // num_devices
    result = output.copy()
    for p in range(num_devices):
        for i in range(in_off.shape[1]):
            q, s = i // per, send[p, i]
            result[q, out_off[p, i]:out_off[p, i] + s] = operand[p, in_off[p, i]:in_off[p, i] + s]
    return result


@pytest.mark.parametrize("per", [1, 2])
def test_padded_ragged_all_to_all_matches_numpy_model(per):
    """Random sizes, offsets with gaps on both sides, `per` slices per destination; rows that
    nothing lands on keep `output`; NaN padding never reaches the result."""
    n, rows, out_rows, width = 8, 24, 40, 3
    slices = n * per
    rng = np.random.default_rng(per)
    operand = rng.standard_normal((n, rows, width)).astype(np.float32)
    output = rng.standard_normal((n, out_rows, width)).astype(np.float32)
    send = np.zeros((n, slices), np.int32)
    in_off = np.zeros_like(send)
    for p in range(n):       # disjoint slices of the operand, in random order with gaps
        cuts = np.sort(rng.choice(rows + 1, 2 * slices, replace=True))
        order = rng.permutation(slices)
        in_off[p, order], send[p, order] = cuts[0::2], cuts[1::2] - cuts[0::2]
    # recv_sizes = all_to_all(send_sizes): device q's block p is device p's block q.
    recv = send.reshape(n, n, per).transpose(1, 0, 2).reshape(n, slices)
    out_off = np.zeros_like(send)
    for q in range(n):       # disjoint landing places in each receiver, random order, gaps
        sizes = recv[q]
        gap = out_rows - sizes.sum()
        assert gap >= 0
        cuts = np.sort(rng.choice(gap + 1, slices, replace=True))
        order = rng.permutation(slices)
        starts = cuts + np.concatenate([[0], np.cumsum(sizes[order])[:-1]])
        landing = np.zeros(slices, np.int32)
        landing[order] = starts
        # the sender of received slice j = p*per + t is p, its slice q*per + t
        for j in range(slices):
            p, t = divmod(j, per)
            out_off[p, q * per + t] = landing[j]
    mesh = cpu_mesh((n,), ("x",))
    flat = lambda a: jnp.asarray(a.reshape(n * a.shape[1], *a.shape[2:]))
    fn = jax.jit(jax.shard_map(
        functools.partial(padded_ragged_all_to_all, axis_name="x", pad_value=float("nan")),
        mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))
    got = fn(flat(operand), flat(output), flat(in_off), flat(send), flat(out_off), flat(recv))
    want = _ragged_all_to_all_numpy(operand, output, in_off, send, out_off, n)
    np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want)


# ------------------------------------------------------------------------- TPU, without a TPU
def test_compiles_for_tpu_with_ragged_all_to_all_and_mosaic():
    """Forward + backward of the EP layer for a v5e:2x2 topology (libtpu's compiler, no TPU):
    exchange="ragged" must be the real ragged all-to-all (2 forward, 2 backward) and the grouped
    matmuls Mosaic kernels (3 forward gmm, 3 backward gmm + 3 tgmm). exchange="auto" and
    gmm_impl="auto" must pick the same on a TPU mesh. d = f = 128 tile megablox exactly."""
    pytest.importorskip("libtpu")          # the `tpu` extra; with it installed this must pass
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = Mesh(np.array(topo.devices).reshape(4), ("expert",), axis_types=(AxisType.Auto,))
    d = f = 128
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                    sharding=NamedSharding(mesh, P("expert")))
    w = ExpertWeights(sds((E, d, f), jnp.float32), sds((E, d, f), jnp.float32),
                      sds((E, f, d), jnp.float32))
    args = (sds((N, d), jnp.float32), w, sds((N, K), jnp.int32), sds((N, K), jnp.float32),
            sds((N, d), jnp.float32))
    for exchange, gmm_impl in (("ragged", "pallas"), ("auto", "auto")):
        ffn = functools.partial(expert_parallel_ffn, mesh=mesh, token_spec=P("expert"),
                                ep_axes="expert", exchange=exchange, gmm_impl=gmm_impl)
        lowered = value_and_grads(ffn).lower(*args)
        assert "ragged_all_to_all" in lowered.as_text()
        text = lowered.compile().as_text()
        assert text.count("ragged-all-to-all-start(") == 4, gmm_impl
        assert text.count('custom_call_target="tpu_custom_call"') == 9, gmm_impl
