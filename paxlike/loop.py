"""One training run, in three phases:

    prepare(cfg, workdir)   every check (config, mesh, model divisibility, data, a checkpoint of
                            another model); nothing is written, so a refused start leaves the
                            workdir exactly as it was
    restore(run)            the workdir becomes the run's: half-written saves discarded, tokenizer
                            and config.json written; the state restored from the latest complete
                            checkpoint, or initialised
    train(run, start)       the step loop: train step, hooks (health checks), metrics, eval,
                            checkpoints; SIGTERM saves and stops

`run` chains them. Running the same command again resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from paxlike import config as config_lib
from paxlike import data, metrics
from paxlike.checkpoint import Checkpoints, param_shapes
from paxlike.devices import peak_flops
from paxlike.errors import UserError
from paxlike.mesh import MESH_AXES, build_mesh, describe
from paxlike.step import TrainState
from paxlike.trainer import Trainer


@dataclasses.dataclass
class Run:
    """Everything `prepare` checked and built; nothing of it has touched the workdir."""
    cfg: Any
    workdir: str
    trainer: Trainer
    checkpoints: Checkpoints
    dataset: data.Dataset
    param_shapes: dict[str, list[int]]
    latest_step: int | None      # the newest complete checkpoint, None for a new run


@dataclasses.dataclass
class Start:
    """Where `train` begins: the state after `step` completed steps, and the data position."""
    step: int
    state: TrainState
    train_iter: Any


@dataclasses.dataclass
class StepEnd:
    """What a hook sees after each train step."""
    step: int
    state: TrainState
    metrics: dict            # the train step's outputs, still on the device (reading them waits
                             # for the step: hooks read them only when they must)
    logs: bool               # this step writes a metrics record
    saves: bool              # this step saves a checkpoint


class Hook(Protocol):
    """A health check or other observer of the step loop. `after_step` runs after every train
    step, before anything of that step is logged or saved; raising stops the run (a UserError
    becomes the one-line error of the command line), and the checkpoints already written stay."""
    def after_step(self, event: StepEnd) -> None: ...


class StopOnDivergence:
    """Stops the run when the loss or gradient norm is not finite, checked on the steps that log
    or save (so a diverged state is never checkpointed, and other steps do not wait)."""

    def after_step(self, event: StepEnd) -> None:
        if not (event.logs or event.saves):
            return
        loss, grad_norm = (float(event.metrics[k]) for k in ("loss", "grad_norm"))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise UserError(f"training diverged at step {event.step} (loss {loss}, gradient norm "
                            f"{grad_norm}); lower optimizer.learning_rate or check the data. "
                            f"Earlier checkpoints are kept.")


DEFAULT_HOOKS = (StopOnDivergence(),)


class _Preemption:
    """Turns SIGTERM (how clusters announce preemption) into 'save a checkpoint and stop'."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a test runner thread): nothing to install
            self._previous = None
        return self

    def _handle(self, *_):
        logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
        self.requested = True

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _write_json_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _apply_top_plan(cfg, devices) -> None:
    """mesh.auto: the planner's best plan for these devices replaces the config's mesh sizes,
    sharding preset, microbatches and remat policy (logged, and saved in config.json)."""
    from paxlike.planner import fleets, search
    fleet = fleets.fleet_for_devices(jax.devices() if devices is None else devices)
    result = search.search(cfg, fleet)
    if not result.plans:
        raise UserError(search.infeasible_message(cfg, result))
    best = result.plans[0]
    best.plan.apply(cfg)  # existing keys only, so a locked config accepts it
    logging.info("mesh.auto: plan %s, preset %s, %d microbatches, remat=%s on %s: predicted "
                 "%.2f GiB per device, step %.3g s (%s)", best.plan.describe(), best.plan.preset,
                 best.plan.microbatches, best.plan.remat, fleet.name,
                 best.bytes_per_device / 1024 ** 3, best.step_time_s, result.why(best))


# ------------------------------------------------------------------------------------ phases
def prepare(cfg, workdir: str, devices=None) -> Run:
    """Every check that could refuse the run, in the order a user would fix them. Writes
    nothing (the checkpoint manager is opened read-only here)."""
    config_lib.validate(cfg)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory; choose another path")
    if cfg.mesh.get("auto"):
        _apply_top_plan(cfg, devices)
    mesh = build_mesh({axis: cfg.mesh[axis] for axis in MESH_AXES}, cfg.mesh.dcn.to_dict(),
                      devices)
    trainer = Trainer(cfg, mesh)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                              async_save=cfg.async_checkpoints)
    shapes = param_shapes(trainer.abstract_state().params)
    latest = checkpoints.latest_step()
    if latest is not None:
        checkpoints.check_compatible(latest, cfg.model.to_dict(), shapes)
    dataset = data.build(cfg.data, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                         seed=cfg.seed, workdir=workdir, batch_sharding=trainer.batch_sharding,
                         save_tokenizer=False)
    if dataset.tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the {cfg.data.tokenizer} tokenizer has {dataset.tokenizer.vocab_size} "
                        f"tokens but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    return Run(cfg, workdir, trainer, checkpoints, dataset, shapes, latest)


def restore(run: Run) -> Start:
    """Takes the workdir (only the primary process writes files) and returns the starting state:
    the latest complete checkpoint's, or a freshly initialised one."""
    if jax.process_index() == 0:
        os.makedirs(run.workdir, exist_ok=True)
        run.checkpoints.discard_incomplete()
        run.dataset.save_tokenizer()
        _write_json_atomically(os.path.join(run.workdir, "config.json"),
                               config_lib.to_json(run.cfg))
    train_iter = run.dataset.train_iterator()
    if run.latest_step is None:
        return Start(0, run.trainer.init_state(), train_iter)
    state, meta = run.checkpoints.restore(run.latest_step, run.trainer.abstract_state())
    train_iter.set_state(meta["data_state"])
    logging.info("resumed from step %d", run.latest_step)
    return Start(run.latest_step, state, train_iter)


def evaluate(trainer: Trainer, params, dataset, token_bytes) -> dict:
    sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in dataset.eval_batches():
        out = jax.device_get(trainer.eval_step(params, batch, token_bytes))
        for k in sums:
            sums[k] += float(out[k])
    return {"eval_loss": sums["nll"] / max(sums["tokens"], 1.0),
            "bits_per_byte": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)}


def train(run: Run, start: Start, hooks: Sequence[Hook] = DEFAULT_HOOKS,
          stop_at: int | None = None) -> list[float]:
    """Steps from `start.step + 1` to `cfg.steps` (or `stop_at`, which stops early with a
    checkpoint exactly as a preemption would). Returns the logged losses."""
    cfg, trainer = run.cfg, run.trainer
    state, train_iter = start.state, start.train_iter
    writer = metrics.MetricsWriter(run.workdir, enabled=jax.process_index() == 0,
                                   total_steps=cfg.steps)
    if start.step:
        writer.truncate_after(start.step)
    token_bytes = jnp.asarray(np.asarray(run.dataset.tokenizer.token_bytes, np.float32))
    num_params = sum(math.prod(s) for s in run.param_shapes.values())
    flops_per_step = trainer.flops_per_step()
    peak = peak_flops(trainer.mesh.devices.flat,
                              jnp.dtype(cfg.model.get("compute_dtype", "float32")),
                              cfg.peak_tflops_per_device)
    logging.info("mesh %s; %.2fM parameters; %d tokens/step; %.3g FLOPs/step; peak %.3g FLOP/s",
                 describe(trainer.mesh), num_params / 1e6, cfg.batch_size * cfg.seq_len,
                 flops_per_step, peak)

    def save(step):
        run.checkpoints.save(step, state, {"step": step, "data_state": train_iter.get_state(),
                                           "model": cfg.model.to_dict(),
                                           "param_shapes": run.param_shapes})

    losses = []
    compile_start = time.perf_counter()
    trainer.compile(state)
    logging.info("compiled the train step in %.1f s", time.perf_counter() - compile_start)
    interval_start, interval_steps = time.perf_counter(), 0
    # finally: an error (e.g. a diverged loss) still lets the last asynchronous save complete.
    try:
        with _Preemption() as preemption:
            for step in range(start.step + 1, cfg.steps + 1):
                state, step_metrics = trainer.train_step(state, next(train_iter))
                interval_steps += 1
                if step == stop_at:
                    preemption.requested = True
                last = step == cfg.steps or preemption.requested
                log_now = step % cfg.log_every == 0 or last
                save_now = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last
                event = StepEnd(step, state, step_metrics, logs=log_now, saves=save_now)
                for hook in hooks:
                    hook.after_step(event)
                if log_now:
                    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    step_time = (time.perf_counter() - interval_start) / interval_steps
                    record.update(step_time_s=step_time,
                                  tokens_per_sec=cfg.batch_size * cfg.seq_len / step_time,
                                  mfu=flops_per_step / step_time / peak)
                    writer.write_train(step, record)
                    losses.append(record["loss"])
                if cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    writer.write_eval(step, evaluate(trainer, state.params, run.dataset,
                                                     token_bytes))
                if save_now:
                    save(step)
                if log_now:
                    interval_start, interval_steps = time.perf_counter(), 0
                if preemption.requested:
                    logging.warning("stopped at step %d; run again to resume", step)
                    break
    finally:
        run.checkpoints.close()
        writer.close()
    return losses


def run(cfg, workdir: str, devices=None, stop_at: int | None = None,
        hooks: Sequence[Hook] = DEFAULT_HOOKS) -> list[float]:
    """Trains `cfg` in `workdir` (resuming if it holds checkpoints). Returns the logged losses.

    `stop_at` stops early after that step with a checkpoint, exactly as a preemption would.
    """
    prepared = prepare(cfg, workdir, devices)
    if prepared.latest_step is not None and prepared.latest_step >= cfg.steps:
        logging.info("already trained to step %d (steps=%d): nothing to do; raise --config.steps "
                     "to train further", prepared.latest_step, cfg.steps)
        prepared.checkpoints.close()
        return []
    return train(prepared, restore(prepared), hooks, stop_at)
