"""One training run, start to finish: checks, state, the step loop, eval, checkpoints, metrics.

Everything that could reject the user's input (config, mesh, model divisibility, data, an
incompatible checkpoint) runs before anything is written, so a failed start leaves the workdir
exactly as it was. Running the same command again resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from paxlike import config as config_lib
from paxlike import data, hardware, metrics
from paxlike.checkpoint import Checkpoints, param_shapes
from paxlike.errors import UserError
from paxlike.mesh import MESH_AXES, build_mesh, describe
from paxlike.trainer import Trainer


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
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(tmp, path)


def evaluate(trainer: Trainer, params, dataset, token_bytes) -> dict:
    sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in dataset.eval_batches():
        out = jax.device_get(trainer.eval_step(params, batch, token_bytes))
        for k in sums:
            sums[k] += float(out[k])
    return {"eval_loss": sums["nll"] / max(sums["tokens"], 1.0),
            "bits_per_byte": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)}


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


def run(cfg, workdir: str, devices=None, stop_at: int | None = None) -> list[float]:
    """Trains `cfg` in `workdir` (resuming if it holds checkpoints). Returns the logged losses.

    `stop_at` stops early after that step with a checkpoint, exactly as a preemption would.
    """
    config_lib.validate(cfg)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory; choose another path")
    if cfg.mesh.get("auto"):
        _apply_top_plan(cfg, devices)
    sizes = {axis: cfg.mesh[axis] for axis in MESH_AXES}
    mesh = build_mesh(sizes, cfg.mesh.dcn.to_dict(), devices)
    trainer = Trainer(cfg, mesh)
    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoints)
    shapes = param_shapes(trainer.abstract_state().params)
    start = ckpts.latest_step()
    if start is not None:
        ckpts.check_compatible(start, cfg.model.to_dict(), shapes)
    dataset = data.build(cfg.data, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                         seed=cfg.seed, workdir=workdir, batch_sharding=trainer.batch_sharding,
                         save_tokenizer=False)
    if dataset.tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the {cfg.data.tokenizer} tokenizer has {dataset.tokenizer.vocab_size} "
                        f"tokens but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")

    if start is not None and start >= cfg.steps:
        logging.info("already trained to step %d (steps=%d): nothing to do; raise --config.steps "
                     "to train further", start, cfg.steps)
        ckpts.close()
        return []

    # Checks passed: from here on the workdir is ours to write.
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
        ckpts.discard_incomplete()
        dataset.save_tokenizer()
        _write_json_atomically(os.path.join(workdir, "config.json"), config_lib.to_json(cfg))
    writer = metrics.MetricsWriter(workdir, enabled=primary, total_steps=cfg.steps)
    train_iter = dataset.train_iterator()
    if start is None:
        start = 0
        state = trainer.init_state()
    else:
        state, meta = ckpts.restore(start, trainer.abstract_state())
        train_iter.set_state(meta["data_state"])
        writer.truncate_after(start)
        logging.info("resumed from step %d", start)
    token_bytes = jnp.asarray(np.asarray(dataset.tokenizer.token_bytes, np.float32))

    num_params = sum(math.prod(s) for s in shapes.values())
    flops_per_step = trainer.flops_per_step()
    peak = hardware.peak_flops(mesh.devices.flat, jnp.dtype(cfg.model.get("compute_dtype", "float32")),
                               cfg.peak_tflops_per_device)
    logging.info("mesh %s; %.2fM parameters; %d tokens/step; %.3g FLOPs/step; peak %.3g FLOP/s",
                 describe(mesh), num_params / 1e6, cfg.batch_size * cfg.seq_len,
                 flops_per_step, peak)

    def save(step):
        ckpts.save(step, state, {"step": step, "data_state": train_iter.get_state(),
                                 "model": cfg.model.to_dict(), "param_shapes": shapes})

    losses = []
    compile_start = time.perf_counter()
    trainer.compile(state)
    logging.info("compiled the train step in %.1f s", time.perf_counter() - compile_start)
    interval_start, interval_steps = time.perf_counter(), 0
    # finally: an error (e.g. a diverged loss) still lets the last asynchronous save complete.
    try:
        with _Preemption() as preemption:
            for step in range(start + 1, cfg.steps + 1):
                state, step_metrics = trainer.train_step(state, next(train_iter))
                interval_steps += 1
                if step == stop_at:
                    preemption.requested = True
                last = step == cfg.steps or preemption.requested
                log_now = step % cfg.log_every == 0 or last
                save_now = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last
                if log_now or save_now:  # never checkpoint a diverged state
                    loss, grad_norm = (float(step_metrics[k]) for k in ("loss", "grad_norm"))
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        raise UserError(f"training diverged at step {step} (loss {loss}, gradient "
                                        f"norm {grad_norm}); lower optimizer.learning_rate or "
                                        f"check the data. Earlier checkpoints are kept.")
                if log_now:
                    step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    step_time = (time.perf_counter() - interval_start) / interval_steps
                    step_metrics.update(step_time_s=step_time,
                                        tokens_per_sec=cfg.batch_size * cfg.seq_len / step_time,
                                        mfu=flops_per_step / step_time / peak)
                    writer.write_train(step, step_metrics)
                    losses.append(step_metrics["loss"])
                if cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    writer.write_eval(step, evaluate(trainer, state.params, dataset, token_bytes))
                if save_now:
                    save(step)
                if log_now:
                    interval_start, interval_steps = time.perf_counter(), 0
                if preemption.requested:
                    logging.warning("stopped at step %d; run again to resume", step)
                    break
    finally:
        ckpts.close()
        writer.close()
    return losses
