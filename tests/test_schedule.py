"""The learning-rate schedule's own length, optimizer.decay_steps: the default (0 = the run's steps)
keeps every schedule value as before, and a finished run extended by raising `steps` continues at
the floor rate instead of stretching the cosine over the new total."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import small_test_config
from paxlike import config as config_lib
from paxlike import loop, optim
from paxlike.errors import UserError


def _schedule_before(opt_cfg, total_steps):
    """The schedule exactly as paxlike/optim.py built it before optimizer.decay_steps existed."""
    peak = opt_cfg.learning_rate
    warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * opt_cfg.min_lr_ratio)


@pytest.mark.parametrize("steps, warmup, ratio", [(300, 30, 0.1), (5, 2, 0.1), (1, 30, 0.0),
                                                  (20000, 2000, 0.1), (7, 0, 1.0)])
def test_default_schedule_is_unchanged(steps, warmup, ratio):
    cfg = config_lib.base_config()
    assert cfg.optimizer.decay_steps == 0
    cfg.steps = steps
    cfg.optimizer.update(warmup_steps=warmup, min_lr_ratio=ratio)
    before = _schedule_before(cfg.optimizer, steps)
    counts = jnp.arange(steps + 10, dtype=jnp.int32)   # int32 like TrainState.step
    now = optim.learning_rate_schedule(cfg.optimizer, steps)
    np.testing.assert_array_equal(jax.jit(jax.vmap(now))(counts),
                                  jax.jit(jax.vmap(before))(counts))
    for c in (0, steps // 2, steps, steps + 3):
        assert float(now(jnp.int32(c))) == float(before(jnp.int32(c)))
    # A new run fixes the length at its steps: the same schedule again.
    assert optim.resolve_decay_steps(cfg, None) == steps == cfg.optimizer.decay_steps
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(optim.learning_rate_schedule(cfg.optimizer, steps)))(counts),
        jax.jit(jax.vmap(before))(counts))


def test_resolve_decay_steps():
    def cfg(steps, decay_steps=0):
        c = config_lib.base_config()
        c.steps, c.optimizer.decay_steps = steps, decay_steps
        return c
    meta = {"step": 100, "decay_steps": 100}
    assert optim.resolve_decay_steps(cfg(100), None) == 100          # new run: its steps
    c = cfg(150)
    assert optim.resolve_decay_steps(c, meta) == 100                 # resumed: as started
    assert c.optimizer.decay_steps == 100 and optim.schedule_meta(c) == {"decay_steps": 100}
    assert optim.resolve_decay_steps(cfg(150, 150), meta) == 150     # explicit wins
    assert optim.resolve_decay_steps(cfg(150, 80), None) == 80
    assert optim.resolve_decay_steps(cfg(150), {"step": 100}) == 150  # a checkpoint from before
    # A config without the key (not made by base_config) still works.
    bare = ml_collections.ConfigDict({"steps": 9, "optimizer": {"learning_rate": 1.0}})
    bare.lock()
    assert optim.resolve_decay_steps(bare, None) == 9 and bare.optimizer.decay_steps == 9
    for bad in (-1, True):   # (a float is refused by the config's type check already)
        c = small_test_config()
        c.optimizer.decay_steps = bad
        with pytest.raises(UserError, match=r"optimizer.decay_steps=.* must be an integer >= 0"):
            config_lib.validate(c)


def test_explicit_decay_steps_then_floor():
    opt = config_lib.base_config().optimizer
    opt.update(decay_steps=50, warmup_steps=5, learning_rate=1e-3, min_lr_ratio=0.1)
    schedule = optim.learning_rate_schedule(opt, 300)
    np.testing.assert_allclose(float(schedule(5)), 1e-3, rtol=1e-6)
    floor = float(schedule(50))
    np.testing.assert_allclose(floor, 1e-4, rtol=1e-6)
    assert all(float(schedule(c)) == floor for c in (51, 120, 299, 10**6))
    assert float(schedule(49)) > floor


def _learning_rates(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["learning_rate"] for r in map(json.loads, f) if "learning_rate" in r}


def test_extending_a_finished_run_continues_at_the_floor(tmp_path):
    workdir = str(tmp_path / "run")
    N, K = 6, 4
    first = small_test_config(steps=N, **{"data.eval_batches": 0})
    loop.run(first, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optimizer"]["decay_steps"] == N    # the effective length, shown
    extended = small_test_config(steps=N + K, **{"data.eval_batches": 0})
    assert extended.optimizer.decay_steps == 0                  # the same command, steps raised
    loop.run(extended, workdir)
    lr = _learning_rates(workdir)
    assert sorted(lr) == list(range(1, N + K + 1))
    opt = first.optimizer
    floor = opt.learning_rate * opt.min_lr_ratio
    # Steps 1..N: the schedule of a run of N steps, as before (step s uses count s - 1).
    before = _schedule_before(opt, N)
    for s in range(1, N + 1):
        np.testing.assert_allclose(lr[s], float(before(s - 1)), rtol=1e-6, atol=1e-12)
    # Steps after N: the floor, from the first extended step on (count N is where the cosine
    # reached it), with no jump back up.
    np.testing.assert_allclose(lr[N + 1], floor, rtol=1e-6)
    assert all(lr[s] == lr[N + 1] for s in range(N + 1, N + K + 1))
    assert lr[N] >= lr[N + 1] and max(lr[s] for s in range(2, N + K + 1)) == lr[3]
    # (Stretching the cosine over N + K, the old behaviour, would have jumped back up.)
    assert float(_schedule_before(opt, N + K)(N)) > 1.5 * floor
    # The checkpoint records the length, so a third extension keeps it too.
    from paxlike.checkpoint import Checkpoints
    meta = Checkpoints(os.path.join(workdir, "checkpoints"), keep=3,
                       async_save=False).read_meta(N + K)
    assert meta["decay_steps"] == N
