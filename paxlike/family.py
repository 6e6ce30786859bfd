"""What a model family provides, and how the trainer finds it.

A model family is one module named by the config key `model.module` (the built-in families live in
`models/`, installed as `paxlike.models`). The trainer, planner and CLI know a family only through
this contract, so adding one is a file in `models/` and a file in `experiments/`, and no edit here
(docs/architecture.md, "Adding a model family"). The module provides

    default_config()                     the `model` config section; its `module` key names the
                                         module itself
    validate(model_cfg) -> list[str]     problems with that section, each naming the key and the
                                         fix (optional; [] when all is well)
    build(model_cfg, rngs)               the Flax NNX model; every parameter carries logical axis
                                         names (paxlike/sharding.py maps them onto the mesh)
    flops_per_token(model_cfg, seq_len)  training FLOPs per token: the numerator of MFU

and the model that `build` returns has

    model.loss(batch, *, dropout_key=None, stats=None) -> ModelLoss

and optionally

    model.reads_global_stats             False when its loss never reads `stats` (it returns them
                                         only to be summed): the gradient schedule then skips the
                                         forward pass that gathers them first (default True)
    model.update_buffers(stats) -> None  changes the model's non-trainable variables (declared
                                         as an `nnx.Variable` that is not an `nnx.Param`, used
                                         under `stop_gradient`) after each optimizer step, from
                                         `ModelLoss.stats` summed over the global batch; e.g. a
                                         router's auxiliary-loss-free balancing bias

and, for sampling (`python -m paxlike.generate`, paxlike/decode.py; docs/generate.md), optionally

    model.prefill(tokens, positions, segment_ids, *, max_len) -> (logits [B, vocab], cache)
                                         left-padded prompts (padding: segment 0) into a
                                         fresh cache with room for max_len tokens; the logits
                                         after each row's last token
    model.decode_step(tokens [B], cache) -> (logits [B, vocab], cache)
                                         one more token per row, the cache's shapes unchanged
    model.decode_length_limited          True when positions beyond the training seq_len were
                                         never trained (the CLI then refuses longer requests)

and, for the mesh planner (`paxlike.plan`, `mesh.auto`; docs/planner.md), the module optionally
provides

    planner_profile(model_cfg)           what the cost model needs beyond the model's parameter
                                         shapes and logical names (abstract build), its saved
                                         activations (traced) and `flops_per_token`: a
                                         `paxlike.planner.workingset.Profile` subclass giving
                                         the per-device sizes of its transient arrays (`units`),
                                         the arrays live at its candidate peaks per remat policy
                                         (`working_set`), remat's extra FLOPs per token, the
                                         tensor-parallel sums per layer, the tables read by
                                         token (`lookup_params`) and its width and depth. A
                                         family without one trains and AOT-compiles; the planner
                                         says it cannot plan it.

where `batch` holds [B, T] arrays under `paxlike.data.BATCH_KEYS` and `dropout_key` is None when
evaluating. The loss comes back in parts (`ModelLoss`) so that the gradient schedule
(paxlike/step.py) can combine microbatches exactly. Auxiliary losses enter the objective with the
weights in `model.aux_loss_weights` ({name: weight}); a family with auxiliary losses declares that
section in its `default_config()`, so every name has a weight and a mistyped override fails.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import chex
import jax

from paxlike.errors import UserError

REQUIRED = ("default_config", "build", "flops_per_token")


@chex.dataclass(frozen=True)
class ModelLoss:
    """A model's loss on one batch (or microbatch), in parts that add up over microbatches.

    nll_sum     Σ weight · token negative log-likelihood (float32 scalar)
    weight_sum  Σ weight: how many target tokens count
    aux         {name: auxiliary loss of this batch} (float32 scalars). Over a global batch split
                into microbatches each is averaged over the (equal-sized) microbatches; it enters
                the objective times its weight and is logged under its name.
    metrics     {name: (sum, count)}: logged as Σ sum / Σ count over the whole global batch.
    stats       sums over the batch that a loss must see for the whole global batch (for example
                the tokens routed to each expert, for global-batch load balancing). Called with
                `stats=None` the model uses its own batch's; called with `stats` it must use
                those: the gradient schedule passes the totals over every microbatch.
    """
    nll_sum: jax.Array
    weight_sum: jax.Array
    aux: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)
    stats: Any = dataclasses.field(default_factory=dict)


def load(model_cfg):
    """The module of the family named by `model.module`, checked against the contract."""
    name = model_cfg.get("module")
    if not name:
        raise UserError("config has no model.module; an experiment file must name the module of "
                        "its model family (see docs/architecture.md)")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"model.module={name!r} cannot be imported: {e}") from e
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"model.module={name!r} is not a model family: it has no "
                        f"{', '.join(missing)} (a family provides {', '.join(REQUIRED)}; see "
                        f"docs/architecture.md)")
    return module


def validate(model_cfg) -> list[str]:
    """The family's own problems with its config section ([] when it has no validate)."""
    module = load(model_cfg)
    return list(module.validate(model_cfg)) if hasattr(module, "validate") else []


def aux_loss_weights(model_cfg) -> dict[str, float]:
    """{auxiliary loss name: weight in the objective}; empty for a family without any."""
    weights = model_cfg.get("aux_loss_weights")
    return {} if weights is None else {k: float(v) for k, v in dict(weights).items()}


def check_loss_names(out: ModelLoss, weights: dict[str, float], reserved) -> None:
    """Every auxiliary loss the model returns has a weight, every weight names one, and no name
    shadows a record key the trainer writes itself (UserError naming the fix)."""
    returned = set(out.aux)
    problems = []
    if returned - set(weights):
        problems.append(f"the model returns auxiliary loss(es) {sorted(returned - set(weights))} "
                        f"with no weight; declare them in model.aux_loss_weights")
    if set(weights) - returned:
        problems.append(f"model.aux_loss_weights names {sorted(set(weights) - returned)}, which "
                        f"the model does not return (it returns {sorted(returned) or 'none'})")
    negative = sorted(name for name, w in weights.items() if w < 0)
    if negative:
        problems.append(f"model.aux_loss_weights {negative} must be >= 0 (0 turns a loss off "
                        f"while still logging it)")
    clashes = (returned | set(out.metrics)) & set(reserved)
    if clashes:
        problems.append(f"auxiliary loss or metric name(s) {sorted(clashes)} clash with the "
                        f"trainer's own record keys; rename them in the model")
    pairs = [n for n, v in out.metrics.items()
             if not (isinstance(v, (tuple, list)) and len(v) == 2)]
    if pairs:
        problems.append(f"metric(s) {sorted(pairs)} must be (sum, count) pairs, so that the "
                        f"trainer can average them over the whole global batch")
    both = returned & set(out.metrics)
    if both:
        problems.append(f"{sorted(both)} named both an auxiliary loss and a metric")
    if problems:
        raise UserError("; ".join(problems))
