"""The update rule: gradients -> new parameters and optimizer state.

One rule, `OptaxUpdate`: `optimizer.name` AdamW (default) or plain SGD, both with linear warmup,
cosine decay and global-norm clipping; AdamW's weight decay on matrices only.

The schedule's length is `optimizer.decay_steps` (warmup included); after it the rate stays at
`learning_rate * min_lr_ratio`. 0 means the run's `steps`, taken once, when the run starts: the
loop calls `resolve_decay_steps` before building the trainer, which writes the effective length
into the config (so config.json shows it) and the loop records it in every checkpoint's meta
(`schedule_meta`). A resumed run with decay_steps=0 takes the length its checkpoint recorded, so
raising `--config.steps` on a finished run continues at the floor rate instead of stretching the
cosine over the new total; an explicit decay_steps > 0 always wins (e.g. to decay again). This is the seam where an outer optimizer (DiLoCo-style: every H
steps an outer step on the averaged parameter change, paxlike/outer.py) trains replicas that each
use this rule as their inner rule: `make_update_rule` chooses it from the config, and the train
step (paxlike/step.py) only calls `init` and `apply`.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from absl import logging

# The checkpoint meta key holding the schedule length a run was started with.
DECAY_STEPS_META = "decay_steps"


def decay_length(opt_cfg, total_steps: int) -> int:
    """The schedule length: `opt_cfg.decay_steps` when > 0, else `total_steps`."""
    decay_steps = opt_cfg.get("decay_steps", 0) or 0
    return int(decay_steps) if decay_steps > 0 else int(total_steps)


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, cosine decay to `learning_rate * min_lr_ratio` at
    `decay_length(opt_cfg, total_steps)`, then constant. The value at optimizer step count c is the
    rate of step c + 1 (what metrics.jsonl logs as that step's learning_rate)."""
    peak = opt_cfg.learning_rate
    length = decay_length(opt_cfg, total_steps)
    warmup = min(opt_cfg.warmup_steps, max(length - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(length, warmup + 1), end_value=peak * opt_cfg.min_lr_ratio)


def resolve_decay_steps(cfg, saved_meta: dict | None = None) -> int:
    """Fixes the schedule length of this run in `cfg.optimizer.decay_steps` and returns it.

    An explicit `optimizer.decay_steps > 0` stays. 0 takes the length recorded in the meta of the
    checkpoint being resumed (`saved_meta`), and for a new run (no checkpoint) `cfg.steps`. A
    checkpoint written before the length was recorded resumes with `cfg.steps`, as before.
    """
    opt = cfg.optimizer
    explicit = opt.get("decay_steps", 0) or 0
    saved = (saved_meta or {}).get(DECAY_STEPS_META)
    saved = int(saved) if isinstance(saved, (int, float)) and saved > 0 else None
    if explicit > 0:
        length = int(explicit)
        if saved is not None and saved != length:
            step = int((saved_meta or {}).get("step", 0))
            logging.info("optimizer.decay_steps=%d replaces the schedule length %d recorded in "
                         "the checkpoint of step %d: the learning rate follows the new schedule "
                         "from there (it may jump)", length, saved, step)
    elif saved is not None:
        length = saved
        if length != cfg.steps:
            logging.info("learning-rate schedule: keeping the length %d the run was started with "
                         "(recorded in its checkpoint; steps=%d now): the rate stays at "
                         "learning_rate * min_lr_ratio after step %d; set "
                         "--config.optimizer.decay_steps to change it", length, cfg.steps, length)
    else:
        length = int(cfg.steps)
        if saved_meta is not None:
            logging.info("the checkpoint of step %s records no learning-rate schedule length "
                         "(written before optimizer.decay_steps existed): the schedule spans "
                         "steps=%d; if the run was started with fewer steps, pass that number as "
                         "--config.optimizer.decay_steps to keep its schedule",
                         saved_meta.get("step"), length)
    if "decay_steps" in opt:
        opt.decay_steps = length
    else:   # a config made without the key (not from config.base_config)
        with opt.unlocked():
            opt.decay_steps = length
    return length


def schedule_meta(cfg) -> dict:
    """What the loop adds to every checkpoint's meta: the schedule length (after
    `resolve_decay_steps`, the effective one)."""
    return {DECAY_STEPS_META: decay_length(cfg.optimizer, cfg.steps)}


@dataclasses.dataclass(frozen=True)
class OptaxUpdate:
    """An optax gradient transformation as the update rule; its state is the optax state."""
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    def init(self, params):
        return self.tx.init(params)

    def apply(self, grads, opt_state, params, step):
        """(new params, new optimizer state, {"learning_rate": the rate used at `step`})."""
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"learning_rate": self.schedule(step)}

    def state_shardings(self, abstract_opt_state, param_shardings, replicated):
        """Moments follow their parameter, scalars are replicated. (jit of `tx.init` on an Auto
        mesh would replicate the moments, so their shardings are given explicitly.)"""
        return optax.tree_map_params(
            self.tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def adamw(opt_cfg, total_steps: int, decay_mask) -> OptaxUpdate:
    """`decay_mask`: pytree of bools like the params, True where weight decay applies."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    return OptaxUpdate(optax.chain(*parts), schedule)


def sgd(opt_cfg, total_steps: int) -> OptaxUpdate:
    """Plain SGD on the same schedule and clipping (no momentum, no weight decay): the inner rule
    under which one DiLoCo round of one step is exactly a data-parallel SGD step."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    parts.append(optax.sgd(schedule))
    return OptaxUpdate(optax.chain(*parts), schedule)


OPTIMIZERS = ("adamw", "sgd")


def make_update_rule(opt_cfg, total_steps: int, decay_mask) -> OptaxUpdate:
    """The update rule `optimizer.name` asks for (with `optimizer.outer`, each replica's)."""
    if opt_cfg.get("name", "adamw") == "sgd":
        return sgd(opt_cfg, total_steps)
    return adamw(opt_cfg, total_steps, decay_mask)
