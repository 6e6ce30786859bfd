"""One training run, in three phases:

    prepare(cfg, workdir)   every check (config, mesh, model divisibility, data, a checkpoint of
                            another model); nothing is written, so a refused start leaves the
                            workdir exactly as it was
    restore(run)            the workdir becomes the run's: half-written saves discarded, tokenizer
                            and config.json written; the state restored from the latest complete
                            checkpoint, or initialised
    train(run, start)       the step loop: train step, bad-step policy (paxlike/health.py),
                            hooks, metrics, eval, checkpoints, the watchdog (paxlike/watchdog.py);
                            a preemption notice saves and stops, on every process at one step

`run` chains them. Running the same command again resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import signal
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from paxlike import config as config_lib
from paxlike import data, health, metrics, watchdog
from paxlike import elastic, optim, outer, sharding, storage
from paxlike.data import tokenizer as tokenizer_lib
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


class _Preemption:
    """Turns a preemption notice (SIGTERM, how clusters announce one) into "save a checkpoint and
    stop", at the same step on every process.

    Under `jax.distributed`, JAX's preemption service catches SIGTERM on whichever process gets
    it and agrees with all the others on a step to stop after (`reached_preemption_sync_point`,
    asked once per loop iteration with a counter that runs alike on every process); a Python
    handler would replace its handler, so none is installed then. Otherwise SIGTERM is handled
    here."""

    def __init__(self):
        from jax._src import distributed   # the public API does not say whether it is running
        self.requested = False
        self._previous = None
        self._synced = distributed.global_state.preemption_sync_manager is not None

    def __enter__(self):
        if self._synced:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a test runner thread): nothing to install
            self._previous = None
        return self

    def _handle(self, *_):
        logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
        self.requested = True

    def poll(self, iteration: int) -> bool:
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(iteration):
                logging.warning("preemption notice: every process saves after this step and stops")
                self.requested = True
        return self.requested

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Profiler:
    """`profile_steps` "A:B": a jax.profiler trace from the dispatch of step A until step B has
    finished, written where TensorBoard's Profile tab (and XProf, Perfetto) read it."""

    def __init__(self, steps: str, log_dir: str):
        self.range, self.log_dir, self.active = config_lib.profile_range(steps), log_dir, False

    def before(self, step: int) -> None:
        if self.range and step == self.range[0] and not self.active:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.range[1]:
            jax.block_until_ready(outputs)     # the trace must hold step B's device work
            self.stop()
            logging.info("profile of steps %d-%d written to %s (tensorboard --logdir %s, "
                         "Profile tab)", *self.range, self.log_dir, self.log_dir)

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _write_json_atomically(path: str, text: str) -> None:
    storage.write_atomically(path, text)   # local: path.tmp renamed over path; gs://: one write


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
    metrics.check_config(cfg.get("metrics"))
    storage.check_workdir(workdir)
    if storage.exists(workdir) and not storage.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory; choose another path")
    checkpoints = Checkpoints(storage.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                              async_save=cfg.async_checkpoints)
    # The newest checkpoint whose meta reads (newer unreadable ones are moved aside by
    # `restore`): the layout that wrote it decides the microbatches before the trainer exists.
    latest, saved_meta = checkpoints.newest_readable()
    saved_layout = (saved_meta or {}).get("layout")
    optim.resolve_decay_steps(cfg, saved_meta)   # the schedule's length, before the trainer
    if cfg.mesh.get("auto"):
        _apply_top_plan(cfg, devices)
    try:
        mesh = build_mesh({axis: cfg.mesh[axis] for axis in MESH_AXES}, cfg.mesh.dcn.to_dict(),
                          devices)
    except UserError as e:
        num_devices = len(jax.devices() if devices is None else devices)
        raise elastic.mesh_error(e, saved_layout, latest, num_devices) from None
    stages = mesh.shape["pipeline"]
    resume = elastic.plan_resume(
        saved_layout, step=latest, devices=mesh.size,
        processes=len({d.process_index for d in mesh.devices.flat}), mesh_shape=dict(mesh.shape),
        batch_size=cfg.batch_size, microbatches=cfg.microbatches,
        ways=elastic.batch_ways(mesh.shape, sharding.get_rules(cfg.sharding, mesh), stages),
        elastic=cfg.get("elastic_microbatches", True) and not cfg.mesh.get("auto"),
        multiple_of=stages)
    if resume.message:
        logging.info("%s", resume.message)
    cfg.microbatches = resume.microbatches   # an existing key: a locked config accepts it
    checkpoints.layout = resume.layout
    trainer = Trainer(cfg, mesh)
    outer.check_resume(saved_meta, latest, trainer.outer)
    shapes = param_shapes(trainer.abstract_state().params)
    if latest is not None:
        checkpoints.check_compatible(latest, cfg.model.to_dict(), shapes, saved_meta)
    dataset = data.build(cfg.data, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                         seed=cfg.seed, workdir=workdir, batch_sharding=trainer.batch_sharding,
                         save_tokenizer=False, length_order=trainer.length_order)
    tokenizer_lib.check_vocab_size(dataset.tokenizer, cfg.model.vocab_size)
    return Run(cfg, workdir, trainer, checkpoints, dataset, shapes, latest)


def restore(run: Run) -> Start:
    """The starting state: the newest checkpoint that restores, or a freshly initialised one.
    Restoring comes first, so that when no checkpoint restores the run is refused with nothing
    written; then the run takes the workdir (only the primary process writes files), and newer
    checkpoints that failed to restore are moved aside to `checkpoints.damaged/` with a warning."""
    restored = None
    if run.latest_step is not None:
        model = run.cfg.model.to_dict()
        restored = run.checkpoints.restore_newest(
            run.latest_step, run.trainer.abstract_state(),
            check=lambda step, meta: run.checkpoints.check_compatible(
                step, model, run.param_shapes, meta))
    if jax.process_index() == 0:
        storage.makedirs(run.workdir)
        run.checkpoints.discard_incomplete()
        run.dataset.save_tokenizer()
        _write_json_atomically(storage.join(run.workdir, "config.json"),
                               config_lib.to_json(run.cfg))
    train_iter = run.dataset.train_iterator()
    if restored is None:
        return Start(0, run.trainer.init_state(), train_iter)
    step, state, meta, damaged = restored
    if damaged:
        run.checkpoints.set_aside(damaged, resumed_from=step)
    train_iter.set_state(meta["data_state"])
    run.latest_step = step
    logging.info("resumed from step %d", step)
    return Start(step, state, train_iter)


def evaluate(trainer: Trainer, params, dataset, token_bytes) -> dict:
    sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in dataset.eval_batches():
        out = jax.device_get(trainer.eval_step(params, batch, token_bytes))
        for k in sums:
            sums[k] += float(out[k])
    return {"eval_loss": sums["nll"] / max(sums["tokens"], 1.0),
            "bits_per_byte": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)}


# Per-operation metadata, and the tables of source files, functions and stack frames it refers to.
_HLO_DEBUG_INFO = re.compile(r", metadata=\{[^}]*\}|"
                             r"^(?:FileNames|FunctionNames|FileLocations|StackFrames)\n(?:.+\n)*",
                             re.M)


def _fingerprint(compiled) -> str:
    """A short hash of the compiled train step: equal on every process of a healthy job. The
    debug information (source files and lines of each operation) is left out: it names the
    Python files each process happened to run from."""
    return hashlib.sha256(_HLO_DEBUG_INFO.sub("", compiled.as_text()).encode()).hexdigest()[:16]


def _roll_back(run: Run, anomaly: health.Anomaly, position: int, train_iter, rollbacks: int):
    """The state of the newest checkpoint (or a fresh one), with the data iterator at its
    position and the bad step's batch skipped from now on. Returns (state, step)."""
    run.checkpoints.close()   # waits for an asynchronous save still in flight
    newest = run.checkpoints.latest_step()
    back = None
    if newest is not None:    # a damaged checkpoint is set aside, as on resume
        back, state, meta, damaged = run.checkpoints.restore_newest(
            newest, run.trainer.abstract_state(), check=lambda step, meta: None)
        if damaged:
            run.checkpoints.set_aside(damaged, resumed_from=back)
        train_iter.set_state(meta["data_state"])
    else:
        state = run.trainer.init_state()
        train_iter.set_state(dict(train_iter.get_state(), batch_index=0))
    train_iter.skip(position)
    logging.warning("bad step %d (%s): rolled back to %s, and the data batch at position %d is "
                    "skipped from now on (rollback %d of at most %d, health.max_rollbacks)",
                    anomaly.step, anomaly.reason,
                    "a fresh start" if back is None else f"the checkpoint of step {back}",
                    position, rollbacks, run.cfg.health.max_rollbacks)
    return state, back or 0


def _refusal(anomaly: health.Anomaly, policy: str, rollbacks: int) -> UserError:
    what = ("training diverged" if not math.isfinite(anomaly.loss + anomaly.grad_norm)
            else "loss spike")
    if policy == "rollback":
        advice = (f"{rollbacks} rollbacks already (health.max_rollbacks={rollbacks}): lower "
                  f"optimizer.learning_rate or check the data")
    else:
        advice = ("lower optimizer.learning_rate or check the data, or set health.policy=rollback "
                  "to return to the last checkpoint and skip the batch")
    return UserError(f"{what} at step {anomaly.step} ({anomaly.reason}); {advice}. Earlier "
                     f"checkpoints are kept.")


def _report_bad_replicas(step: int, step_metrics: dict, writer) -> None:
    """After an outer step: replicas left out of it because they were not finite (they restart
    from the outer parameters; paxlike/outer.py)."""
    bad = int(float(step_metrics["bad_replicas"]))
    if bad:
        logging.warning("step %d: %d replica(s) had a non-finite loss, gradient or parameters; "
                        "left out of the outer step and restarted from the outer parameters",
                        step, bad)
        writer.write_event(step, "bad_replicas", {"count": bad})


def checkpoint_meta(run: Run, step: int, train_iter) -> dict:
    """What a checkpoint records besides the state: where the data stands, the model's config
    and shapes (to refuse another model), the learning-rate schedule's length."""
    meta = {"step": step, "data_state": train_iter.get_state(), "model": run.cfg.model.to_dict(),
            "param_shapes": run.param_shapes, **optim.schedule_meta(run.cfg)}
    if run.trainer.outer:
        meta[outer.META_KEY] = run.trainer.outer.meta()
    return meta


def train(run: Run, start: Start, hooks: Sequence[Hook] = (),
          stop_at: int | None = None) -> list[float]:
    """Steps from `start.step + 1` to `cfg.steps` (or `stop_at`, which stops early with a
    checkpoint exactly as a preemption would). Returns the logged losses."""
    cfg, trainer = run.cfg, run.trainer
    state, train_iter = start.state, start.train_iter
    primary = jax.process_index() == 0
    writer = metrics.MetricsWriter.from_config(cfg, run.workdir, enabled=primary)
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
    guard = health.LossGuard(cfg.health)
    dog = watchdog.Watchdog(cfg.watchdog, process_index=jax.process_index(),
                            num_processes=jax.process_count(),
                            client=watchdog.distributed_client())

    def save(step):
        dog.update(phase="save")
        run.checkpoints.save(step, state, checkpoint_meta(run, step, train_iter))

    logged, rollbacks = [], 0     # logged: (step, loss) of the steps that stand
    profiler = _Profiler(cfg.profile_steps, os.path.join(run.workdir, metrics.TENSORBOARD_DIR))
    # finally: an error (e.g. a diverged loss) still lets the last asynchronous save complete.
    dog.start()
    finished = False
    try:
        with _Preemption() as preemption:
            dog.update(phase="compile")
            compile_start = time.perf_counter()
            compiled = trainer.compile(state)
            logging.info("compiled the train step in %.1f s", time.perf_counter() - compile_start)
            dog.update(phase="train", fingerprint=_fingerprint(compiled))
            interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
            step, iteration = start.step, 0
            while step < cfg.steps:
                step, iteration = step + 1, iteration + 1
                position = train_iter.position
                wait_start = time.perf_counter()
                batch = next(train_iter)
                data_wait += time.perf_counter() - wait_start
                profiler.before(step)
                state, step_metrics = trainer.train_step(state, batch, step)
                profiler.after(step, step_metrics)
                interval_steps += 1
                if step == stop_at:
                    preemption.requested = True
                last = step == cfg.steps or preemption.poll(iteration)
                log_now = step % cfg.log_every == 0 or last
                save_now = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last
                anomaly = None
                if guard.reads_every_step or log_now or save_now:
                    anomaly = guard.check(step, float(step_metrics["loss"]),
                                          float(step_metrics["grad_norm"]))
                if anomaly:
                    if cfg.health.policy != "rollback" or rollbacks >= cfg.health.max_rollbacks:
                        raise _refusal(anomaly, cfg.health.policy, rollbacks)
                    rollbacks += 1
                    state, step = _roll_back(run, anomaly, position, train_iter, rollbacks)
                    writer.truncate_after(step)
                    guard.forget_after(step)
                    logged = [(s, loss) for s, loss in logged if s <= step]
                    writer.write_event(anomaly.step, "rollback", {
                        "to_step": step, "skipped_batch": position, "bad_loss": anomaly.loss,
                        "reason": anomaly.reason})
                    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                    continue
                if trainer.syncs_after(step):
                    _report_bad_replicas(step, step_metrics, writer)
                evaluates = bool(cfg.eval_every and (step % cfg.eval_every == 0 or last))
                if save_now or evaluates:   # noloco: the replicas' mean becomes the model
                    state = trainer.consolidate(state)
                event = StepEnd(step, state, step_metrics, logs=log_now, saves=save_now)
                for hook in hooks:
                    hook.after_step(event)
                dog.update(step=step, host_s=data_wait / interval_steps)
                if log_now:
                    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    step_time = (time.perf_counter() - interval_start) / interval_steps
                    record.update(tokens_seen=step * cfg.batch_size * cfg.seq_len,
                                  step_time_s=step_time,
                                  tokens_per_sec=cfg.batch_size * cfg.seq_len / step_time,
                                  mfu=flops_per_step / step_time / peak)
                    writer.write_train(step, record)
                    logged.append((step, record["loss"]))
                    dog.update(step_time_s=step_time)
                    for straggler in (dog.stragglers() if primary else ()):
                        logging.warning("straggler: process %d spends %.3g s per step on the "
                                        "host (waiting for data), the others %.3g s",
                                        straggler["process"], straggler["host_s"],
                                        straggler["others_median_host_s"])
                        writer.write_event(step, "straggler", straggler)
                if evaluates:
                    dog.update(phase="eval")
                    writer.write_eval(step, evaluate(trainer, state.params, run.dataset,
                                                     token_bytes))
                if save_now:
                    save(step)
                dog.update(phase="train")
                if log_now:
                    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                if preemption.requested:
                    logging.warning("stopped at step %d; run again to resume", step)
                    break
        dog.update(phase="save")     # closing the checkpoints waits for the last save
        finished = True
    except BaseException as e:
        dog.report_failure(e)
        raise
    finally:
        profiler.stop()
        run.checkpoints.close()
        writer.close()
        # After an error in a multi-process job the watchdog stays armed until this process
        # exits: the cleanup above (and, outside the CLI, jax's shutdown barrier at exit) can wait
        # for peers that are dead or blocked, and the watchdog is what ends that wait.
        if finished or jax.process_count() == 1:
            dog.close()
    return [loss for _, loss in logged]


def run(cfg, workdir: str, devices=None, stop_at: int | None = None,
        hooks: Sequence[Hook] = ()) -> list[float]:
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
