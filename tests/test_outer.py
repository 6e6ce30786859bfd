"""Training across weak links (paxlike/outer.py): DiLoCo, streaming DiLoCo, NoLoCo and CO2 over
the `data` axis as replicas, checked against independent references (plain data parallelism,
pairwise averaging written out in numpy, a full sync, DiLoCo one round earlier), plus NaN
containment, exact resume and the refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import small_test_config, snapshot
from paxlike import loop, outer, sharding
from paxlike.checkpoint import Checkpoints
from paxlike.errors import UserError
from paxlike.mesh import build_mesh
from paxlike.trainer import Trainer

MESH = {"data": 2, "fsdp": 4}


def outer_config(method="none", **overrides):
    # SGD inner steps at a large rate, no clipping: one DiLoCo round of one step is then exactly
    # a data-parallel step, and differences between methods are far above float rounding.
    keys = {"optimizer.name": "sgd", "optimizer.learning_rate": 0.5, "optimizer.clip_norm": 0.0,
            "optimizer.warmup_steps": 0, "optimizer.outer": method,
            "optimizer.outer_every": 1, "optimizer.outer_lr": 1.0,
            "optimizer.outer_momentum": 0.0}
    return small_test_config(**{**keys, **overrides})


def batch_for(trainer, seed):
    rng = np.random.default_rng(seed)
    shape = (trainer.cfg.batch_size, trainer.cfg.seq_len)
    batch = {"inputs": rng.integers(0, 512, shape), "targets": rng.integers(0, 512, shape),
             "segment_ids": np.ones(shape), "positions": np.broadcast_to(np.arange(shape[1]), shape),
             "weights": np.ones(shape)}
    return {k: jax.device_put(np.asarray(v, np.float32 if k == "weights" else np.int32),
                              trainer.batch_sharding) for k, v in batch.items()}


def train(cfg, steps, mesh=MESH, state=None, first=1):
    trainer = Trainer(cfg, build_mesh(mesh))
    state = trainer.init_state() if state is None else state
    metrics = None
    for step in range(first, first + steps):
        state, metrics = trainer.train_step(state, batch_for(trainer, step), step)
    return trainer, state, metrics


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                                            host(a), host(b))))


def test_diloco_with_one_step_rounds_is_data_parallel_sgd():
    _, plain, plain_metrics = train(outer_config("none"), 3)
    _, diloco, metrics = train(outer_config("diloco"), 3)
    assert max_diff(plain.params, diloco.params) < 1e-6
    assert max_diff(plain.params, jax.tree.map(lambda r: r[1], diloco.opt_state["replicas"])) < 1e-6
    assert abs(float(plain_metrics["loss"]) - float(metrics["loss"])) < 1e-6
    assert float(metrics["bad_replicas"]) == 0
    # the replicas really trained apart before the sync (else the equality above proves nothing)
    trainer = Trainer(outer_config("diloco"), build_mesh(MESH))
    inner, _ = trainer.program(())(jax.tree.map(jnp.copy, diloco), batch_for(trainer, 4))
    rows = jax.tree.leaves(host(inner.opt_state["replicas"]))[0]
    assert np.abs(rows[0] - rows[1]).max() > 1e-4


def test_noloco_with_two_replicas_is_pairwise_averaging():
    # Two replicas are one pair; with outer lr 1 and no momentum both outer rules reduce to
    # "every replica takes the pair's mean" (the anchors start equal).
    keys = {"optimizer.outer_every": 2}
    _, diloco, _ = train(outer_config("diloco", **keys), 4)
    trainer, noloco, _ = train(outer_config("noloco", **keys), 4)
    assert max_diff(diloco.opt_state["replicas"], noloco.opt_state["replicas"]) < 1e-6
    assert max_diff(diloco.params, trainer.consolidate(noloco).params) < 1e-6


def _noloco_reference(replicas, anchors, momentum, pairs, lr, mu):
    """NoLoCo's outer step written out for one matching, replica by replica."""
    peer = {a: b for x, y in pairs for a, b in ((x, y), (y, x))}
    out_anchor, out_momentum = np.empty_like(anchors), np.empty_like(momentum)
    for r in range(len(replicas)):
        p = peer[r]
        mean_local = ((replicas[r] - anchors[r]) + (replicas[p] - anchors[p])) / 2
        mean_anchor = (anchors[r] + anchors[p]) / 2
        out_momentum[r] = mu * momentum[r] + lr * mean_local + lr * (mean_anchor - anchors[r])
        out_anchor[r] = anchors[r] + out_momentum[r]
    return out_anchor, out_momentum


def test_noloco_gossip_against_numpy_over_rounds():
    cfg = outer_config("noloco", **{"optimizer.outer_lr": 0.7, "optimizer.outer_momentum": 0.6})
    mesh = build_mesh({"data": 4, "fsdp": 2})
    rules = sharding.get_rules(cfg.sharding, mesh)
    rng = np.random.default_rng(0)
    shape = (4, 6, 8)   # [replicas, ...] of one parameter, rows sharded over `data`
    arrays = {name: jax.device_put(rng.normal(size=shape).astype(np.float32),
                                   jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
              for name in ("replicas", "anchors", "momentum")}
    rule = outer.Outer("noloco", 1, 0.7, 0.6, 1, 4, cfg.seed, (None,))

    @jax.jit
    def sync(state, step):
        with sharding.use_rules(mesh, rules):
            ok = jnp.ones(4, bool)
            _, new = rule._noloco(None, {k: [v] for k, v in state.items()}, ok, (0,), step)
            return new["anchors"][0], new["momentum"][0], new["replicas"][0]

    seen = set()
    for step in range(12):
        anchor, momentum, replicas = host(sync(arrays, jnp.int32(step)))
        np.testing.assert_array_equal(anchor, replicas)   # every replica restarts from its anchor
        matches = []
        for index, pairs in enumerate(outer.matchings(4)):
            want_anchor, want_momentum = _noloco_reference(
                *(np.asarray(arrays[k]) for k in ("replicas", "anchors", "momentum")),
                pairs, 0.7, 0.6)
            if (np.allclose(anchor, want_anchor, atol=1e-6)
                    and np.allclose(momentum, want_momentum, atol=1e-6)):
                matches.append(index)
        assert len(matches) == 1, f"step {step}: result is no single matching's ({matches})"
        seen.add(matches[0])
    assert len(seen) > 1, "the seeded stream must draw different matchings over rounds"
    assert {frozenset(p) for pairs in outer.matchings(4) for p in pairs} == {
        frozenset((a, b)) for a in range(4) for b in range(a + 1, 4)}


def test_streaming_fragments_together_equal_a_full_sync():
    keys = {"optimizer.outer_every": 4, "optimizer.outer_lr": 0.7, "optimizer.outer_momentum": 0.9}
    streaming = Trainer(outer_config("diloco", **keys, **{"optimizer.outer_fragments": 2}),
                        build_mesh(MESH))
    full = Trainer(outer_config("diloco", **keys), build_mesh(MESH))
    assert [streaming.syncs_after(s) for s in range(1, 9)] == [(), (1,), (), (0,), (), (1,), (), (0,)]
    assert [full.syncs_after(s) for s in range(1, 9)] == [(), (), (), (0,), (), (), (), (0,)]
    state = full.init_state()
    for step in range(1, 4):
        state, _ = full.train_step(state, batch_for(full, step), step)
    batch = batch_for(full, 4)
    copy = lambda s: jax.tree.map(jnp.copy, s)
    together, _ = streaming.program((0, 1))(copy(state), batch)
    whole, _ = full.program((0,))(copy(state), batch)
    assert max_diff(together, whole) == 0.0
    # one fragment alone: its layers synced (equal across replicas), the others' still apart
    one, _ = streaming.program((1,))(copy(state), batch)
    layers = one.opt_state["replicas"]["layers"]
    rows = host(jax.tree.leaves(layers)[0])
    np.testing.assert_array_equal(rows[0][1::2], rows[1][1::2])
    assert np.abs(rows[0][0::2] - rows[1][0::2]).max() > 1e-4


def test_co2_applies_each_round_one_round_late():
    # With outer lr 1 and no momentum, DiLoCo's outer parameters after round r are CO2's after
    # round r + 1 (the second round's inner work only reaches CO2 a round later).
    _, diloco, _ = train(outer_config("diloco"), 1)
    _, co2, _ = train(outer_config("co2"), 2)
    assert max_diff(diloco.params, co2.params) < 1e-6
    _, after_one, _ = train(outer_config("co2"), 1)
    fresh = Trainer(outer_config("co2"), build_mesh(MESH)).init_state()
    assert max_diff(after_one.params, fresh.params) == 0.0   # nothing applied yet


@pytest.mark.parametrize("method", ["diloco", "noloco"])
def test_a_nan_replica_is_left_out_and_restarted(method):
    cfg = outer_config(method, **{"optimizer.outer_every": 2})
    trainer, state, _ = train(cfg, 1)
    poisoned = state.replace(opt_state=dict(state.opt_state, replicas=jax.tree.map(
        lambda r: r.at[1].set(jnp.nan), state.opt_state["replicas"])))
    # replica 0's inner step, which the NaN of replica 1 must not touch
    inner, _ = trainer.program(())(jax.tree.map(jnp.copy, poisoned), batch_for(trainer, 2))
    replica0 = jax.tree.map(lambda r: r[0], host(inner.opt_state["replicas"]))
    old_anchor0 = jax.tree.map(lambda r: r[0], host(state.opt_state.get("anchors", {})))
    synced, metrics = trainer.train_step(poisoned, batch_for(trainer, 2), 2)
    assert float(metrics["bad_replicas"]) == 1
    assert np.isfinite(float(metrics["loss"]))
    synced = trainer.consolidate(synced)
    for tree in (synced.params, synced.opt_state):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(tree)))
    rows = host(synced.opt_state["replicas"])
    if method == "diloco":
        # the mean over the finite replica alone (outer lr 1, no momentum): replica 0's result,
        # and both replicas restart from it
        assert max_diff(synced.params, replica0) < 1e-6
        assert max_diff(jax.tree.map(lambda r: r[1], rows), replica0) < 1e-6
    else:
        # replica 0 averages with nobody (lr 1: its own inner result); replica 1 restarts from
        # its peer's outer parameters
        assert max_diff(jax.tree.map(lambda r: r[0], rows), replica0) < 1e-6
        assert max_diff(jax.tree.map(lambda r: r[1], rows), old_anchor0) == 0.0
    inner_state = host(synced.opt_state["inner"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(inner_state))


def _settings(**overrides):
    return outer_config(**{"steps": 7, "checkpoint_every": 2, "eval_every": 0, **overrides})


@pytest.mark.parametrize("method,extra", [("diloco", {"optimizer.outer_fragments": 2}),
                                          ("noloco", {})])
def test_resume_across_an_outer_step_is_exact(tmp_path, method, extra):
    keys = {"optimizer.outer": method, "optimizer.outer_every": 3, "optimizer.name": "adamw",
            "optimizer.learning_rate": 1e-2, "optimizer.outer_momentum": 0.9,
            "optimizer.outer_lr": 0.7, "mesh.data": 2, "mesh.fsdp": 4,
            "model.dropout_rate": 0.1, **extra}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    loop.run(_settings(**keys), str(straight))
    loop.run(_settings(**keys), str(resumed), stop_at=4)   # saved between syncs
    loop.run(_settings(**keys), str(resumed))
    losses = []
    for workdir in straight, resumed:
        with open(workdir / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        losses.append([r["loss"] for r in records if "loss" in r])
    assert len(losses[0]) == 7 and losses[0] == losses[1]
    cfg = _settings(**keys)
    abstract = Trainer(cfg, build_mesh(MESH)).abstract_state()
    states = [Checkpoints(str(w / "checkpoints"), keep=3, async_save=False).restore(7, abstract)[0]
              for w in (straight, resumed)]
    assert max_diff(states[0], states[1]) == 0.0


def test_resuming_with_another_replica_count_or_method_is_refused(tmp_path):
    keys = {"optimizer.outer": "diloco", "optimizer.outer_every": 2, "mesh.data": 2,
            "mesh.fsdp": 4, "steps": 2}
    workdir = tmp_path / "run"
    loop.run(_settings(**keys), str(workdir))
    before = snapshot(workdir)
    with pytest.raises(UserError, match=r"holds 2 diloco replicas .*mesh.data=4.*"
                                        r"--config.mesh.data=2"):
        loop.run(_settings(**{**keys, "mesh.data": 4, "mesh.fsdp": 2, "steps": 4}),
                 str(workdir))
    with pytest.raises(UserError, match=r"written with optimizer.outer=diloco.*"
                                        r"optimizer.outer=none"):
        loop.run(_settings(**{**keys, "optimizer.outer": "none", "steps": 4}),
                 str(workdir))
    assert snapshot(workdir) == before


@pytest.mark.parametrize("overrides,message", [
    ({"optimizer.outer": "gossip"}, "optimizer.outer='gossip'; choose one of"),
    ({"optimizer.outer": "noloco", "optimizer.outer_fragments": 2}, "needs optimizer.outer=diloco"),
    ({"optimizer.outer": "diloco", "optimizer.outer_fragments": 8, "optimizer.outer_every": 4},
     "must be <= optimizer.outer_every=4"),
    ({"optimizer.outer": "diloco", "optimizer.outer_momentum": 1.0}, r"must be in \[0, 1\)"),
    ({"optimizer.name": "lion"}, "optimizer.name='lion'; choose one of adamw, sgd"),
])
def test_bad_outer_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        loop.prepare(outer_config(**overrides), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_noloco_needs_an_even_replica_count(tmp_path):
    cfg = outer_config("noloco", **{"mesh.data": 1, "mesh.fsdp": 8})
    with pytest.raises(UserError, match="mesh.data=1 must be even and >= 2"):
        loop.prepare(cfg, str(tmp_path / "w"))


@pytest.mark.parametrize("method", ["diloco", "noloco"])
def test_planner_prices_the_outer_step_as_compiled(method):
    # Derived, not fitted: the planner's collective volume per step (one f32 copy of the local
    # parameters all-reduced, or two permuted to a peer, per H steps; no per-step gradient sum
    # over `data`) against the compiled inner and outer programs averaged over H steps. On
    # data 8 every collective is over `data` (8 replicas: NoLoCo's 7 matchings are switch
    # branches, each counted at 1/7).
    from paxlike.planner import cost, fleets, hlo
    every = 4
    cfg = outer_config(method, **{"optimizer.outer_every": every, "optimizer.name": "adamw"})
    trainer = Trainer(cfg, build_mesh({"data": 8, "fsdp": 1}))
    volume = lambda sync: sum(v["volume"] for v in hlo.collectives(
        trainer.compile(sync=sync).as_text(), 8).values())
    compiled = (volume((0,)) + (every - 1) * volume(())) / every
    plan = cost.Plan.make({"data": 8, "fsdp": 1}, {}, cfg.sharding, 1, cfg.model.remat)
    predicted = cost.estimate(cfg, plan, fleets.parse_fleet("cpu-8"), "cpu")
    assert sum(predicted.comm_by_kind.values()) == pytest.approx(compiled, rel=0.01)
    kind = "collective-permute" if method == "noloco" else "all-reduce"
    params = predicted.memory["params"] / 2   # the outer parameters and one replica's
    assert predicted.comm_by_kind[kind] == pytest.approx(params * (2 if method == "noloco" else 1)
                                                         / every, rel=0.01)
