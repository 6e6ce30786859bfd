"""The train step, in three parts that later features replace one at a time:

    train_step(state, batch) = update rule ∘ gradient schedule ∘ model loss

1. **Model loss** (`paxlike.family.ModelLoss`): the model family computes its weighted token NLL
   sums, auxiliary losses, metrics and global-batch statistics for a (micro)batch.
2. **Gradient schedule**: how the global batch becomes gradients. `Accumulate` (below) splits it
   into microbatches and sums their gradients in a `lax.scan`; `Pipeline` sends the whole batch
   through the layer stack split into stages over the `pipeline` mesh axis (paxlike/pipeline.py)
   as microbatches in flight. A schedule receives `loss_fn(params, batch, dropout_key, stats) ->
   ModelLoss`.
3. **Update rule** (`paxlike.optim`): gradients → new parameters and optimizer state (optax).
   With an outer optimizer (paxlike/outer.py) this whole step is each replica's inner step,
   `vmap`ped over the replicas, and every H steps an outer step follows.

The functions are pure; `paxlike.trainer.Trainer` gives them shardings and compiles them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax

from paxlike import pipeline, sharding
from paxlike.family import ModelLoss

LossFn = Callable[[Any, dict, "jax.Array | None", Any], ModelLoss]


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # int32 scalar: number of completed optimizer steps
    params: Any          # nested dict of float32 arrays, as `nnx.to_pure_dict(nnx.state(model))`
    opt_state: Any       # the update rule's state (optax's for `OptaxUpdate`)
    rng: jax.Array       # uint32[2]; the dropout key of step s is fold_in(rng, s)


@flax.struct.dataclass
class Gradients:
    """What a gradient schedule returns for one global batch."""
    grads: Any                  # d objective / d params, like the params
    loss: jax.Array             # mean token NLL over the global batch
    aux: dict                   # {name: auxiliary loss over the global batch}
    metrics: dict               # {name: metric averaged over the global batch}
    stats: Any = None           # the model's `ModelLoss.stats` summed over the global batch


class GradientSchedule(Protocol):
    """Global batch -> gradients of the objective, the mean token NLL and the model's parts."""
    def __call__(self, loss_fn: LossFn, params, batch: dict, key: jax.Array) -> Gradients: ...


class UpdateRule(Protocol):
    """Gradients -> (new params, new state, metrics such as the learning rate); paxlike/optim.py."""
    def init(self, params): ...
    def apply(self, grads, opt_state, params, step) -> tuple[Any, Any, dict]: ...


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def split_microbatches(batch: dict, m: int) -> dict:
    """[B, ...] arrays -> [m, B/m, ...]. Microbatch i takes rows i, i+m, i+2m…: every device keeps
    its own rows, so no resharding happens."""
    return {k: pipeline.to_microbatches(v, m) for k, v in batch.items()}


def _objective(out: ModelLoss, total_weight, aux_share: float, aux_weights: Mapping[str, float]):
    """(objective, parts) of one loss call covering `aux_share` of the global batch: its NLL sum
    over the global batch's weight, plus each auxiliary loss times its weight and share."""
    nll = out.nll_sum / total_weight
    aux = {name: value * aux_share for name, value in out.aux.items()}
    value = nll
    for name, part in aux.items():
        value = value + aux_weights[name] * part
    return value, (nll, aux, out.metrics, out.stats)


def _gradients(grads, parts) -> Gradients:
    loss, aux, metric_sums, stat_sums = parts
    metrics = {name: total / jnp.maximum(count, 1e-30)
               for name, (total, count) in metric_sums.items()}
    return Gradients(grads=grads, loss=loss, aux=aux, metrics=metrics,
                     stats=jax.lax.stop_gradient(stat_sums))


@dataclasses.dataclass(frozen=True)
class Accumulate:
    """Gradient accumulation: the global batch in `microbatches` parts, gradients summed.

    The objective is  mean token NLL over every weighted token of the global batch
                      + Σ_name weight · (auxiliary loss averaged over the microbatches),
    so splitting the batch changes nothing but the order of float additions. Statistics a loss
    needs over the whole global batch (`ModelLoss.stats`) are gathered first, by a forward pass
    over every microbatch (only when the model returns any and there is more than one
    microbatch), and every microbatch's loss then sees the totals.
    """
    microbatches: int
    aux_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # False: the model's losses do not read `stats` (it returns them only to be summed, e.g. for
    # `update_buffers`), so the forward pre-pass is skipped.
    global_stats: bool = True

    def __call__(self, loss_fn: LossFn, params, batch: dict, key: jax.Array) -> Gradients:
        m = self.microbatches
        micro = split_microbatches(batch, m)
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        # The shapes of the model's parts (traced abstractly, no FLOPs): what the scan carries.
        shapes = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro), key, None)
        stats = self._global_stats(loss_fn, params, micro, key, shapes.stats)

        def one(carry, inputs):
            grads, sums = carry
            mb, index = inputs
            mb = _constrain(mb)
            objective = lambda p: _objective(loss_fn(p, mb, jax.random.fold_in(key, index), stats),
                                             total_weight, 1.0 / m, self.aux_weights)
            (_, parts), mb_grads = jax.value_and_grad(objective, has_aux=True)(params)
            return (_add(grads, mb_grads), _add(sums, parts)), None

        zeros = jax.tree.map(jnp.zeros_like, (params, (shapes.nll_sum, shapes.aux, shapes.metrics,
                                                       shapes.stats)))
        (grads, parts), _ = jax.lax.scan(one, zeros, (micro, jnp.arange(m)))
        return _gradients(grads, parts)

    def _global_stats(self, loss_fn: LossFn, params, micro: dict, key: jax.Array, shapes):
        """Σ over microbatches of `ModelLoss.stats`; None (the model uses its own batch's) when
        there is one microbatch or the model keeps no statistics."""
        if self.microbatches == 1 or not self.global_stats or not jax.tree.leaves(shapes):
            return None

        def add_stats(total, inputs):
            mb, index = inputs
            out = loss_fn(params, _constrain(mb), jax.random.fold_in(key, index), None)
            return _add(total, out.stats), None

        zeros = jax.tree.map(jnp.zeros_like, shapes)
        total, _ = jax.lax.scan(add_stats, zeros, (micro, jnp.arange(self.microbatches)))
        return jax.lax.stop_gradient(total)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Pipeline parallelism: one loss call over the whole global batch, whose layer stack runs as
    `spec.microbatches` microbatches in flight through `spec.stages` stages (paxlike/pipeline.py).

    The objective is Accumulate's with as many microbatches: the layers see microbatch m with the
    dropout key folded with m, auxiliary losses are averaged over the microbatches, and global-
    batch statistics come from a forward pass first (when the model reads them).
    """
    spec: pipeline.PipelineSpec
    aux_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    global_stats: bool = True

    def __call__(self, loss_fn: LossFn, params, batch: dict, key: jax.Array) -> Gradients:
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        batch = _constrain(batch)
        with pipeline.use(self.spec):
            stats = None
            if self.global_stats and jax.tree.leaves(
                    jax.eval_shape(loss_fn, params, batch, key, None).stats):
                stats = jax.lax.stop_gradient(loss_fn(params, batch, key, None).stats)
            # The model averages its per-microbatch auxiliary losses itself (share 1).
            objective = lambda p: _objective(loss_fn(p, batch, key, stats), total_weight, 1.0,
                                             self.aux_weights)
            (_, parts), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return _gradients(grads, parts)


def _constrain(microbatch: dict) -> dict:
    return {k: sharding.constrain(v, ("batch", "length")) for k, v in microbatch.items()}


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn, schedule: GradientSchedule,
               update: UpdateRule, update_buffers: Callable | None = None
               ) -> tuple[TrainState, dict]:
    """One optimizer step over the global batch. Returns the new state and the step's metrics:
    loss (mean token NLL), grad_norm, param_norm (of the parameters the step started from: read
    while they are live anyway, it adds no memory), the update rule's
    (learning_rate), every auxiliary loss and every model metric under its name.

    `update_buffers(params, stats) -> params`, when given, then changes the model's non-trainable
    variables from the step's global-batch statistics (a router's load-balancing bias); their
    gradients are zero, so the update rule leaves them as they were."""
    dropout_key = jax.random.fold_in(state.rng, state.step)
    result = schedule(loss_fn, state.params, batch, dropout_key)
    params, opt_state, update_metrics = update.apply(result.grads, state.opt_state, state.params,
                                                     state.step)
    if update_buffers is not None:
        params = update_buffers(params, result.stats)
    metrics = {"loss": result.loss, "grad_norm": optax.tree.norm(result.grads),
               "param_norm": optax.tree.norm(state.params), **update_metrics, **result.aux,
               **result.metrics}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
    return new_state, metrics


def eval_sums(loss_fn: LossFn, params, batch: dict, token_bytes: jax.Array) -> dict:
    """Σ NLL, Σ target tokens and Σ target bytes of one eval batch (for loss and bits per byte)."""
    out = loss_fn(params, batch, None, None)
    num_bytes = jnp.sum(jnp.take(token_bytes, batch["targets"]) * batch["weights"])
    return {"nll": out.nll_sum, "tokens": out.weight_sum, "bytes": num_bytes}
