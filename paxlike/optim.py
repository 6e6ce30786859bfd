"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    peak = opt_cfg.learning_rate
    warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * opt_cfg.min_lr_ratio)


def make_optimizer(opt_cfg, total_steps: int, decay_mask) -> tuple[optax.GradientTransformation,
                                                                   optax.Schedule]:
    """`decay_mask`: pytree of bools like the params, True where weight decay applies."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings,
                    replicated):
    """Optimizer-state shardings: moments follow their parameter, scalars are replicated.

    (jit of `tx.init` on an Auto mesh would replicate the moments, so they are given explicitly.)
    """
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
