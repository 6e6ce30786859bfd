"""The mixture-of-experts Transformer (models/moe.py) in the trainer: expert-parallel train steps
against one device, the load-balancing loss at global-batch scope (invariant to microbatches and
data parallelism, where the per-shard and 1/dp-scaled variants are not), the auxiliary-loss-free
bias, dispatch paths against the reference, and config errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import set_keys, shrunk_config
from paxlike import family, sharding, step
from paxlike.experiments import moe as moe_experiment
from paxlike.mesh import build_mesh
from paxlike.models import moe
from paxlike.trainer import Trainer

SMALL_MOE = dict(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 expert_mlp_dim=32, num_experts=8, experts_per_token=2, vocab_size=512)
BATCH, SEQ = 16, 16
STEPS = 5


def moe_config(batch_size=BATCH, **overrides):
    cfg = shrunk_config(moe_experiment, SMALL_MOE, steps=STEPS, **overrides)
    cfg.batch_size, cfg.seq_len = batch_size, SEQ
    return cfg


def random_batches(n: int, seed: int = 0, batch_size: int = BATCH):
    rng = np.random.default_rng(seed)
    shape = (batch_size, SEQ)
    out = []
    for _ in range(n):
        # A skewed token distribution so that routing is skewed too (and capacity drops happen).
        tokens = rng.zipf(1.3, (batch_size, SEQ + 1)) % 512
        out.append({"inputs": tokens[:, :-1].astype(np.int32),
                    "targets": tokens[:, 1:].astype(np.int32),
                    "segment_ids": np.ones(shape, np.int32),
                    "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), shape),
                    "weights": np.ones(shape, np.float32)})
    return out


_INIT = {}


def initial_state(cfg):
    """The initial state of a config as host arrays, made once: every mesh starts from it (the
    sharding preset does not change it)."""
    key = cfg.model.to_json() + str(cfg.seed)
    if key not in _INIT:
        state = Trainer(cfg, build_mesh({}, devices=jax.devices()[:1])).init_state()
        _INIT[key] = jax.tree.map(np.asarray, state)
    return _INIT[key]


def run_steps(cfg, mesh_sizes, devices=None):
    """(per-step metrics, final params as NumPy) of STEPS train steps from the same init."""
    mesh = build_mesh(mesh_sizes, devices=devices)
    trainer = Trainer(cfg, mesh)
    state = jax.device_put(initial_state(cfg), trainer.state_shardings)
    history = []
    for batch in random_batches(STEPS):
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
        state, metrics = trainer.train_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return history, jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def one_device_run():
    """The one-device run the parallel ones are checked against."""
    return run_steps(moe_config(), {}, jax.devices()[:1])


# name: (sharding preset, mesh sizes)
PARALLEL_CASES = {
    "expert8": ("fsdp_tp", {"expert": 8, "fsdp": 1}),
    "expert4_data2": ("fsdp_tp", {"expert": 4, "data": 2, "fsdp": 1}),
    "expert2_fsdp2_tensor2": ("fsdp_tp", {"expert": 2, "fsdp": 2, "tensor": 2}),
    "fold_tensor_expert4_tensor2": ("fold_tensor", {"expert": 4, "tensor": 2, "fsdp": 1}),
    "fold_context_expert4_data2": ("fold_context", {"expert": 4, "data": 2, "fsdp": 1}),
}


@pytest.mark.parametrize("case", sorted(PARALLEL_CASES))
def test_expert_parallel_train_steps_equal_one_device(one_device_run, case):
    preset, sizes = PARALLEL_CASES[case]
    history, params = run_steps(moe_config(sharding=preset), sizes)
    expected_history, expected_params = one_device_run
    for got, want in zip(history, expected_history):
        for key in ("loss", "load_balance", "router_z", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    chex.assert_trees_all_close(params, expected_params, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- global-batch load balancing
def lbl_only(trainer):
    """The trainer's loss with the NLL removed: the gradient is that of the balancing loss."""
    def loss(params, batch, key, stats):
        out = trainer.loss(params, batch, key, stats)
        return out.replace(nll_sum=jnp.zeros_like(out.nll_sum))
    return loss


def lbl_gradient_fn(trainer, microbatches, loss_fn=None):
    """A compiled (params, batch) -> the schedule's output for the balancing loss alone."""
    schedule = step.Accumulate(microbatches, {"load_balance": 1.0, "router_z": 0.0})
    loss_fn = loss_fn or lbl_only(trainer)

    def run(p, b):
        with sharding.use_rules(trainer.mesh, trainer.rules):
            return schedule(loss_fn, p, b, jax.random.PRNGKey(0))
    return jax.jit(run)


def lbl_gradients(trainer, params, batch, microbatches, loss_fn=None):
    return lbl_gradient_fn(trainer, microbatches, loss_fn)(params, batch)


@pytest.fixture(scope="module")
def lbl_trainers():
    cfg = moe_config(batch_size=32)      # 4 microbatches of 8 rows: one per data shard
    one = Trainer(cfg, build_mesh({}, devices=jax.devices()[:1]))
    eight = Trainer(cfg, build_mesh({"data": 8, "fsdp": 1}))
    params = one.init_state().params
    batch = random_batches(1, seed=3, batch_size=32)[0]
    return one, eight, params, batch


def test_global_batch_load_balance_is_invariant_to_microbatches_and_data_parallelism(lbl_trainers):
    one, eight, params, batch = lbl_trainers
    put = lambda t: {k: jax.device_put(v, t.batch_sharding) for k, v in batch.items()}
    whole = lbl_gradients(one, params, put(one), 1)
    assert float(whole.aux["load_balance"]) > 1.0     # routing is skewed: the loss is above 1
    for trainer, m in ((one, 4), (eight, 1)):
        other = lbl_gradients(trainer, jax.device_put(params, trainer.param_shardings),
                              put(trainer), m)
        np.testing.assert_allclose(other.aux["load_balance"], whole.aux["load_balance"], rtol=1e-6)
        # 1e-6 relative; the absolute floor covers float32 summation order on gradients of
        # order 1e-3 (the variants below are off by factors, not ulps).
        chex.assert_trees_all_close(other.grads, whole.grads, rtol=1e-6, atol=1e-8)


def test_per_shard_and_one_over_dp_variants_fail_the_invariance(lbl_trainers):
    """What other systems shipped, on 2 data shards of one device's batch: f_i counted per shard
    (MaxText), and the global f_i with the token total of all shards but P_i of one shard,
    gradients averaged over shards (Megatron-LM #3672: 1/dp too small). Both differ from the
    global-batch gradient that the test above pins down."""
    one, _, params, batch = lbl_trainers
    whole = lbl_gradients(one, params, batch, 1)
    dp = 2
    shards = [{k: v[i::dp] for k, v in batch.items()} for i in range(dp)]
    totals = jax.jit(lambda p: one.loss(p, batch, None, None).stats)(params)
    own = lbl_only(one)

    def global_counts_local_mean(p, b, key, stats):
        # This shard's P over the global token count (Σ_shard p / N_global = P_shard / dp).
        del stats
        out = own(p, b, key, totals)
        return out.replace(aux={**out.aux, "load_balance": out.aux["load_balance"] / dp})

    mean = lambda trees: jax.tree.map(lambda *g: sum(g) / dp, *trees)
    per_shard_fn = lbl_gradient_fn(one, 1)          # one compile serves both shards
    per_shard = mean([per_shard_fn(params, s).grads for s in shards])
    one_over_dp_fn = lbl_gradient_fn(one, 1, global_counts_local_mean)
    one_over_dp = mean([one_over_dp_fn(params, s).grads for s in shards])
    for grads in (per_shard, one_over_dp):
        with pytest.raises(AssertionError):
            chex.assert_trees_all_close(grads, whole.grads, rtol=1e-6, atol=1e-8)


def test_micro_batch_scope_balances_each_microbatch_without_a_statistics_pass():
    cfg = moe_config(batch_size=32, **{"model.load_balance": "micro_batch", "microbatches": 4})
    trainer = Trainer(cfg, build_mesh({}, devices=jax.devices()[:1]))
    assert trainer.schedule.global_stats is False     # its loss never reads the global counts
    params = trainer.init_state().params
    batch = random_batches(1, seed=4, batch_size=32)[0]
    result = lbl_gradients(trainer, params, batch, 4)
    micro = step.split_microbatches(batch, 4)
    own = [trainer.loss(params, {k: v[i] for k, v in micro.items()}, None, None)
           for i in range(4)]
    np.testing.assert_allclose(result.aux["load_balance"],
                               np.mean([o.aux["load_balance"] for o in own]), rtol=1e-6)
    # The step still sums every microbatch's counts (for the router bias and the metrics).
    np.testing.assert_array_equal(result.stats["expert_tokens"],
                                  sum(o.stats["expert_tokens"] for o in own))


# ------------------------------------------------------------------- auxiliary-loss-free bias
def test_aux_loss_free_bias_reduces_load_imbalance():
    """A sigmoid router whose selection starts skewed (experts 0 and 1 get every token) is
    balanced by the bias alone: no balancing loss, a learning rate too small to matter."""
    cfg = moe_config(**{"model.router": "sigmoid", "model.router_bias_rate": 0.02,
                        "model.aux_loss_weights.load_balance": 0.0,
                        "model.aux_loss_weights.router_z": 0.0,
                        "optimizer.learning_rate": 1e-7})
    trainer = Trainer(cfg, build_mesh({}, devices=jax.devices()[:1]))
    state = trainer.init_state()
    router = state.params["layers"]["moe"]["mlp"]["router"]
    router["bias"] = router["bias"].at[:, :2].set(1.0)   # sigmoid scores are below 1: 0, 1 win
    batch = random_batches(1, seed=5)[0]
    imbalance = []
    for _ in range(40):
        state, metrics = trainer.train_step(state, batch)
        imbalance.append(float(metrics["moe_load_max"]))
    assert imbalance[0] == pytest.approx(4.0)          # 2 of 8 experts take every assignment
    assert imbalance[-1] < 0.5 * imbalance[0], imbalance
    bias = np.asarray(state.params["layers"]["moe"]["mlp"]["router"]["bias"])
    assert np.all(bias[:, :2] < 1.0) and np.all(bias[:, 2:].max(-1) > 0)


# ------------------------------------------------------------------- dispatch paths, configs
@pytest.mark.parametrize("overrides,message", [
    ({"experts_per_token": 9}, "experts_per_token=9 exceeds model.num_experts=8"),
    ({"moe_every": 3}, "moe_every=3 must divide model.num_layers=1"),
    ({"router": "relu"}, "router='relu'; choose one of"),
    ({"load_balance": "batch"}, "load_balance='batch'; choose one of"),
    ({"capacity_factor": -1.0}, "capacity_factor=-1.0 must be >= 0"),
    ({"moe_dispatch": "reference", "capacity_factor": 1.0}, "'reference' is dropless"),
])
def test_bad_moe_configs_are_refused_with_the_fix(overrides, message):
    cfg = moe_config()
    set_keys(cfg, {f"model.{k}": v for k, v in overrides.items()})
    problems = family.validate(cfg.model)
    assert any(message in p for p in problems), problems


def test_active_flops_count_only_routed_experts():
    cfg = moe_config().model
    counted = moe.active_params_per_token(cfg)
    assert counted["experts"] == cfg.num_layers * 3 * cfg.d_model * 32 * 2
    assert counted["router"] == cfg.num_layers * cfg.d_model * 8
