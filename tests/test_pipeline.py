"""Pipeline parallelism (paxlike/pipeline.py): the circular schedule computes the unpipelined
model's losses and gradients, bubble slots never leak (their inputs are NaN in every pipelined run
here), it composes with the other mesh axes, checkpoints move between pipeline degrees, and
configs that cannot be pipelined fail before any work."""

import dataclasses
import functools
import jax
import numpy as np
import pytest

from configs import set_keys, shrunk_config
from paxlike import loop, sharding
from paxlike.errors import UserError
from paxlike.experiments import gla, moe, transformer
from paxlike.mesh import build_mesh
from paxlike.trainer import Trainer

BATCH, SEQ, VOCAB, STEPS, LR = 8, 16, 128, 5, 0.05
MICROBATCHES = 4
MODELS = {
    "transformer": (transformer, {"num_layers": 8, "d_model": 32, "num_heads": 4,
                                  "num_kv_heads": 2, "mlp_dim": 64, "vocab_size": VOCAB}),
    "gla": (gla, {"num_layers": 8, "d_model": 32, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": VOCAB, "chunk_size": 16}),
    # Global-batch load balancing: the pipeline's statistics pass and per-layer router outputs.
    "moe": (moe, {"num_layers": 4, "d_model": 32, "num_heads": 4, "num_kv_heads": 2,
                  "mlp_dim": 64, "vocab_size": VOCAB, "num_experts": 4, "expert_mlp_dim": 32,
                  "load_balance": "global_batch"}),
}
ROWS = {"moe": 16}      # its mesh below splits a microbatch 4 ways


def config(family: str, **overrides):
    experiment, model = MODELS[family]
    cfg = shrunk_config(experiment, model, **{"mesh.fsdp": 1})
    cfg.update(batch_size=ROWS.get(family, BATCH), seq_len=SEQ)
    return set_keys(cfg, overrides)


def trainer_on(cfg, sizes: dict, num_devices: int) -> Trainer:
    cfg = set_keys(cfg, {f"mesh.{axis}": size for axis, size in sizes.items()})
    return Trainer(cfg, build_mesh(sizes, devices=jax.devices()[:num_devices]))


def batches(rows: int = BATCH, seed: int = 0) -> list[dict]:
    """STEPS batches of two packed documents per row, a fifth of the targets weighted out."""
    rng = np.random.default_rng(seed)
    shape = (rows, SEQ)
    half = SEQ // 2
    out = []
    for _ in range(STEPS):
        out.append({"inputs": rng.integers(0, VOCAB, shape), "targets": rng.integers(0, VOCAB, shape),
                    "segment_ids": np.repeat([[1] * half + [2] * half], rows, 0),
                    "positions": np.repeat([list(range(half)) * 2], rows, 0),
                    "weights": rng.random(shape) < 0.8})
    return [{k: np.asarray(v, np.float32 if k == "weights" else np.int32) for k, v in b.items()}
            for b in out]


def with_nan_bubbles(trainer: Trainer) -> Trainer:
    """The trainer's pipeline schedule with NaN in every bubble slot before it is masked."""
    spec = dataclasses.replace(trainer.pipeline, bubble_fill=float("nan"))
    trainer.schedule = dataclasses.replace(trainer.schedule, spec=spec)
    return trainer


def gradient_fn(trainer: Trainer):
    """(params, batch) -> (loss, gradients, {auxiliary losses, metrics, statistics}) by the
    trainer's gradient schedule, compiled."""
    def one(params, batch):
        with sharding.use_rules(trainer.mesh, trainer.rules):
            out = trainer.schedule(trainer.loss, params, batch, jax.random.PRNGKey(0))
        return out.loss, out.grads, {"aux": out.aux, "metrics": out.metrics, "stats": out.stats}

    step = jax.jit(one, in_shardings=(trainer.param_shardings, trainer.batch_sharding),
                   out_shardings=(trainer.replicated, trainer.param_shardings,
                                  trainer.replicated))
    return lambda params, batch: jax.tree.map(np.asarray, step(
        jax.device_put(params, trainer.param_shardings),
        jax.device_put(batch, trainer.batch_sharding)))


def run_at(trainer: Trainer, trajectory) -> list[tuple]:
    """(loss, gradients, parts) at each step's parameters and batch of a reference trajectory."""
    grads_of = gradient_fn(trainer)
    return [grads_of(params, batch) for params, batch in trajectory]


@functools.cache
def unpipelined(family: str):
    """The reference: STEPS plain gradient steps (params -= LR · grads) of the model on one
    device, accumulating gradients over the same MICROBATCHES the pipelines split the batch into
    (so the layers see the same [B/M, T, d] blocks). Returns the trajectory [(params, batch)] and
    the (loss, gradients, parts) of each step.

    Pipelined runs are compared at the reference's parameters of each step rather than along
    their own trajectory: float32 gradients of the GLA model amplify differences in the last bit
    by up to 1/sqrt(eps) of its per-head output norm (a head whose output is near zero), which
    compounds over steps without any pipeline (gradient accumulation over 4 microbatches and the
    whole batch at once drift apart by 1e-4 at step 3 on one device)."""
    trainer = trainer_on(config(family, microbatches=MICROBATCHES), {}, 1)
    grads_of = gradient_fn(trainer)
    params = jax.tree.map(np.asarray, trainer.init_state().params)
    trajectory, results = [], []
    for batch in batches(ROWS.get(family, BATCH)):
        trajectory.append((params, batch))
        results.append(grads_of(params, batch))
        params = jax.tree.map(lambda p, d: p - LR * d, params, results[-1][1])
    return trajectory, results


def assert_same_run(run, reference, what: str):
    """Losses, auxiliary losses, metrics and statistics within 1e-5 (relative), and every gradient
    entry within 1e-5 (relative, and absolute relative to the gradient's largest entry), at
    every step."""
    for step, ((loss, grads, parts), (ref_loss, ref_grads, ref_parts)) in enumerate(
            zip(run, reference)):
        where = f"{what}: step {step}"
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=where)
        part_paths = jax.tree_util.tree_flatten_with_path(ref_parts)[0]
        assert jax.tree.structure(parts) == jax.tree.structure(ref_parts), where
        for (path, b), a in zip(part_paths, jax.tree.leaves(parts)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{where}, {jax.tree_util.keystr(path)}")
        for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0],
                                jax.tree.leaves(grads)):
            scale = float(np.max(np.abs(b))) or 1.0
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"{where}, {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("family,stages,repeats", [
    ("transformer", 2, 1), ("transformer", 2, 2), ("transformer", 4, 1), ("transformer", 4, 2),
    ("gla", 2, 2), ("gla", 4, 1)])
def test_pipeline_equals_unpipelined_model(family, stages, repeats):
    """M = 2S and M = S (where a microbatch returns to stage 0 in the iteration it is needed).
    Every (S, R) for the Transformer; for GLA (whose layers differ only in what runs inside a
    stage) both S and both R in two cases, to keep the suite within its time."""
    trajectory, reference = unpipelined(family)
    cfg = config(family, microbatches=MICROBATCHES, pipeline_repeats=repeats)
    trainer = with_nan_bubbles(trainer_on(cfg, {"pipeline": stages}, stages))
    assert trainer.pipeline.iterations == MICROBATCHES * repeats + stages - 1
    assert_same_run(run_at(trainer, trajectory), reference,
                    f"{family} S={stages} R={repeats} M={MICROBATCHES}")


def test_pipeline_with_fsdp_and_tensor_equals_one_device():
    trajectory, reference = unpipelined("transformer")
    cfg = config("transformer", microbatches=MICROBATCHES, pipeline_fsdp_gather="per_step")
    trainer = with_nan_bubbles(trainer_on(cfg, {"pipeline": 2, "fsdp": 2, "tensor": 2}, 8))
    assert_same_run(run_at(trainer, trajectory), reference, "pipeline 2 x fsdp 2 x tensor 2")


def test_pipeline_with_expert_parallel_moe_equals_one_device():
    """Pipeline 2 x expert 2 x fsdp 2: expert-parallel dispatch inside the stages, the router's
    per-layer outputs per microbatch, and global-batch load balancing (its statistics pass runs
    through the pipeline first): losses, router losses and metrics, expert counts and gradients
    equal the one-device run's."""
    trajectory, reference = unpipelined("moe")
    cfg = config("moe", microbatches=MICROBATCHES)
    trainer = with_nan_bubbles(trainer_on(cfg, {"pipeline": 2, "expert": 2, "fsdp": 2}, 8))
    assert trainer.schedule.global_stats
    assert_same_run(run_at(trainer, trajectory), reference, "moe pipeline 2 x expert 2 x fsdp 2")


def loop_config(stages: int, **overrides):
    """A training run on all 8 devices: `stages` pipeline stages, fsdp over the rest."""
    cfg = config("transformer", microbatches=MICROBATCHES, steps=6, checkpoint_every=3,
                 batch_size=32, **{"mesh.pipeline": stages, "mesh.fsdp": 8 // stages,
                                   "model.vocab_size": 512})
    return set_keys(cfg, overrides)


def test_checkpoint_restores_across_pipeline_degrees(tmp_path):
    """Weights are stored in logical layer order whatever the pipeline: a run checkpointed with 4
    stages, resumed with 1 and checkpointed again, then resumed with 2, continues with the losses
    of an uninterrupted run."""
    straight = loop.run(loop_config(1), str(tmp_path / "straight"))
    workdir = str(tmp_path / "4-to-1-to-2")
    losses = (loop.run(loop_config(4, checkpoint_every=2), workdir, stop_at=2)
              + loop.run(loop_config(1, checkpoint_every=2), workdir, stop_at=4)
              + loop.run(loop_config(2, checkpoint_every=2), workdir))
    assert len(losses) == 6
    np.testing.assert_allclose(losses, straight, rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.pipeline": 4, "mesh.fsdp": 2, "model.num_layers": 6},
     r"stacks 6 layer blocks, which mesh.pipeline=4 × pipeline_repeats=1 = 4 does not divide"),
    ({"mesh.pipeline": 2, "mesh.fsdp": 4, "microbatches": 3, "batch_size": 24},
     r"microbatches=3 must be a multiple of mesh.pipeline=2 .* set microbatches to 4"),
    ({"mesh.pipeline": 1, "mesh.fsdp": 8, "pipeline_repeats": 2},
     r"pipeline_repeats=2 needs mesh.pipeline > 1"),
    ({"mesh.pipeline": 2, "mesh.fsdp": 4, "pipeline_fsdp_gather": "once"},
     r"pipeline_fsdp_gather='once'; choose one of \['per_iteration', 'per_step'\]"),
])
def test_unpipelineable_config_fails_before_any_work(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        loop.run(set_keys(loop_config(1), overrides), str(workdir))
    assert not workdir.exists()
