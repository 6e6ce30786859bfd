"""The update rule: gradients -> new parameters and optimizer state.

Today one rule, `OptaxUpdate`: AdamW with linear warmup, cosine decay and global-norm clipping,
weight decay on matrices only. This is the seam where an outer optimizer (DiLoCo-style: every H
steps an outer step on the averaged parameter change) wraps the inner rule: `make_update_rule`
chooses the rule from the config, and the train step (paxlike/step.py) only calls `init` and
`apply`.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    peak = opt_cfg.learning_rate
    warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * opt_cfg.min_lr_ratio)


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


def make_update_rule(opt_cfg, total_steps: int, decay_mask) -> OptaxUpdate:
    """The update rule the config asks for (an outer optimizer will wrap the inner rule here)."""
    return adamw(opt_cfg, total_steps, decay_mask)
