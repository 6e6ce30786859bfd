"""The train step as parts (paxlike/step.py): the model contract's auxiliary losses, metrics and
global-batch statistics through the gradient schedule; the loop's phases and hooks; and a model
family added with no edit in paxlike/ (tests/family_bigram.py, a family defined here)."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import family_bigram
from configs import ROOT, set_keys, subprocess_env
from paxlike import config as config_lib
from paxlike import loop, sharding, step
from paxlike.errors import UserError
from paxlike.mesh import build_mesh
from paxlike.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = {"z_loss": 1e-3, "balance": 1e-2}


def bigram_config(**overrides):
    cfg = config_lib.base_config()
    cfg.model = family_bigram.default_config()
    cfg.update(batch_size=32, seq_len=16, steps=3, log_every=1, eval_every=0, checkpoint_every=0,
               async_checkpoints=False)
    cfg.optimizer.warmup_steps = 1
    return set_keys(cfg, overrides)


@pytest.fixture(scope="module")
def one_device():
    trainer = Trainer(bigram_config(), build_mesh({}, devices=jax.devices()[:1]))
    return trainer, trainer.init_state().params


@pytest.fixture(scope="module")
def eight_devices(one_device):
    trainer = Trainer(bigram_config(), build_mesh({"data": 2, "fsdp": 4}))
    return trainer, jax.device_put(one_device[1], trainer.param_shardings)


def random_batch(seed: int, padded: bool, trainer: Trainer) -> dict:
    rng = np.random.default_rng(seed)
    shape = (32, 16)
    weights = (rng.random(shape) < 0.6) if padded else np.ones(shape)
    batch = {"inputs": rng.integers(0, 512, shape), "targets": rng.integers(0, 512, shape),
             "segment_ids": np.ones(shape), "positions": np.broadcast_to(np.arange(16), shape),
             "weights": weights}
    return {k: jax.device_put(np.asarray(v, np.float32 if k == "weights" else np.int32),
                              trainer.batch_sharding) for k, v in batch.items()}


def _traced(trainer, schedule, params, batch):
    with sharding.use_rules(trainer.mesh, trainer.rules):   # as the trainer traces it
        return schedule(trainer.loss, params, batch, jax.random.PRNGKey(0))


def schedule_result(trainer, params, batch, microbatches) -> step.Gradients:
    schedule = step.Accumulate(microbatches, WEIGHTS)
    return jax.jit(lambda p, b: _traced(trainer, schedule, p, b))(params, batch)


def test_objective_is_mean_nll_plus_weighted_auxiliary_losses(one_device):
    trainer, params = one_device
    batch = random_batch(0, padded=True, trainer=trainer)

    def reference(p):  # the objective written out from the model's parts
        out = trainer.loss(p, batch, None, None)
        return (out.nll_sum / out.weight_sum + WEIGHTS["z_loss"] * out.aux["z_loss"]
                + WEIGHTS["balance"] * out.aux["balance"])

    result = schedule_result(trainer, params, batch, 1)
    out = trainer.loss(params, batch, None, None)
    np.testing.assert_allclose(result.loss, out.nll_sum / out.weight_sum, rtol=1e-6)
    chex.assert_trees_all_close(result.grads, jax.grad(reference)(params), rtol=1e-5, atol=1e-8)
    assert set(result.aux) == set(WEIGHTS) and set(result.metrics) == {"accuracy"}
    assert float(result.aux["balance"]) > 0 and float(result.aux["z_loss"]) > 0


def test_microbatches_on_a_mesh_see_global_batch_statistics(one_device, eight_devices):
    """Four microbatches on 8 devices give the one-device, one-batch objective: the balance loss
    uses the expert-like group frequencies of the whole global batch, not of each microbatch."""
    trainer1, params1 = one_device
    trainer8, params8 = eight_devices
    batch1 = random_batch(1, padded=False, trainer=trainer1)
    batch8 = random_batch(1, padded=False, trainer=trainer8)
    whole = schedule_result(trainer1, params1, batch1, 1)
    split = schedule_result(trainer8, params8, batch8, 4)
    for name in ("loss", "aux", "metrics"):
        chex.assert_trees_all_close(getattr(split, name), getattr(whole, name), rtol=1e-5)
    chex.assert_trees_all_close(split.grads, whole.grads, rtol=1e-4, atol=1e-8)

    # The check has teeth: a schedule that lets each microbatch use its own statistics fails it.
    class OwnStatistics(step.Accumulate):
        def _global_stats(self, *args):
            return None
    own = jax.jit(lambda p, b: _traced(trainer8, OwnStatistics(4, WEIGHTS), p, b))(params8, batch8)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(own.grads, whole.grads, rtol=1e-4, atol=1e-8)


def test_metrics_and_loss_are_global_batch_averages_with_padding(one_device):
    trainer, params = one_device
    batch = random_batch(2, padded=True, trainer=trainer)
    whole = schedule_result(trainer, params, batch, 1)
    split = schedule_result(trainer, params, batch, 4)
    np.testing.assert_allclose(split.loss, whole.loss, rtol=1e-6)
    np.testing.assert_allclose(split.metrics["accuracy"], whole.metrics["accuracy"], rtol=1e-6)
    correct, count = jax.jit(lambda p: trainer.loss(p, batch, None, None).metrics["accuracy"])(params)
    np.testing.assert_allclose(whole.metrics["accuracy"], correct / count, rtol=1e-6)


@pytest.mark.parametrize("weights,message", [
    ({"z_loss": 1e-3}, r"auxiliary loss\(es\) \['balance'\] with no weight"),
    ({"z_loss": 1e-3, "balance": 1e-2, "router_z": 1.0}, r"names \['router_z'\], which the model"),
    ({"z_loss": 1e-3, "balance": -1e-2}, r"aux_loss_weights \['balance'\] must be >= 0"),
])
def test_auxiliary_loss_names_are_checked_before_anything_is_written(tmp_path, weights, message):
    cfg = bigram_config()
    cfg.model.aux_loss_weights = weights
    with pytest.raises(UserError, match=message):
        loop.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_metric_that_is_not_a_sum_and_count_is_refused(tmp_path, monkeypatch):
    original = family_bigram.BigramLM.loss

    def scalar_metric(self, batch, **kw):
        out = original(self, batch, **kw)
        return out.replace(metrics={"accuracy": out.metrics["accuracy"][0]})
    monkeypatch.setattr(family_bigram.BigramLM, "loss", scalar_metric)
    with pytest.raises(UserError, match=r"metric\(s\) \['accuracy'\] must be \(sum, count\)"):
        loop.run(bigram_config(), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_module_that_is_not_a_family_is_refused(tmp_path):
    cfg = bigram_config()
    cfg.model.module = "json"   # importable, but no build / flops_per_token
    with pytest.raises(UserError, match="model.module='json' is not a model family: it has no "
                                        "default_config, build, flops_per_token"):
        loop.run(cfg, str(tmp_path / "run"))


class Recorder:
    def __init__(self, fail_at=None):
        self.events, self.fail_at = [], fail_at

    def after_step(self, event):
        self.events.append((event.step, event.logs, event.saves, float(event.metrics["loss"])))
        if event.step == self.fail_at:
            raise UserError(f"health check failed at step {event.step}")


def test_hooks_see_every_step_and_can_stop_the_run(tmp_path):
    cfg = bigram_config(steps=4, log_every=2, checkpoint_every=1)
    recorder = Recorder()
    losses = loop.run(cfg, str(tmp_path / "ok"), hooks=[recorder])
    assert [e[:3] for e in recorder.events] == [(1, False, True), (2, True, True),
                                                 (3, False, True), (4, True, True)]
    assert [e[3] for e in recorder.events if e[1]] == losses

    stopper = Recorder(fail_at=2)
    with pytest.raises(UserError, match="health check failed at step 2"):
        loop.run(cfg, str(tmp_path / "stopped"), hooks=[stopper])
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == ["1"]
    # The phases can be driven one by one: the stopped run resumes from its checkpoint.
    prepared = loop.prepare(cfg, str(tmp_path / "stopped"))
    assert prepared.latest_step == 1
    start = loop.restore(prepared)
    assert start.step == 1 and int(start.state.step) == 1
    rest = loop.train(prepared, start, hooks=[])
    np.testing.assert_allclose(rest, losses, rtol=1e-6)  # steps 2 and 4 log, as before


EXPERIMENT = '''"""The bigram family, sized (an experiment file a user adds beside the model file)."""
import bigram_lm
from paxlike.config import sized_config

SIZES = {"tiny": dict(model=dict(d_model=32), batch_size=16, seq_len=32, steps=4)}


def get_config(size="tiny"):
    return sized_config("experiments/bigram.py", SIZES, size, bigram_lm.default_config())
'''


def test_a_new_family_is_one_model_file_and_one_experiment_file(tmp_path):
    """No edit in paxlike/: the family's two files live outside the repository, and the command
    line trains it with its auxiliary losses and metric logged under their names."""
    (tmp_path / "models").mkdir()
    (tmp_path / "experiments").mkdir()
    shutil.copy(os.path.join(HERE, "family_bigram.py"), tmp_path / "models" / "bigram_lm.py")
    (tmp_path / "experiments" / "bigram.py").write_text(EXPERIMENT)
    env = dict(subprocess_env(), PYTHONPATH=str(tmp_path / "models"))
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "paxlike.train", f"--config={tmp_path}/experiments/bigram.py:tiny",
         f"--workdir={workdir}", "--cpu_devices=8", "--config.log_every=1",
         "--config.eval_every=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert all(np.isfinite(r[k]) for k in ("loss", "z_loss", "balance", "accuracy")), r
        assert 0 <= r["accuracy"] <= 1 and r["balance"] > 0
    assert [r["step"] for r in records if r.get("split") == "val"] == [4]
    assert json.load(open(workdir / "config.json"))["model"]["module"] == "bigram_lm"
