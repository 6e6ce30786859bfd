"""Pipeline parallelism in one SPMD program: the stacked layers split into stages over the
`pipeline` mesh axis, run by a circular GPipe schedule (docs/pipeline.md).

With S stages, R circular repeats and M microbatches (M a multiple of S), the L stacked layers are
viewed as [R, S, K] with K = L / (R·S): stage s holds, for every repeat r, the K consecutive layers
starting at r·S·K + s·K, so a microbatch passes the stages R times. Work item i = r·M + m is
microbatch m on repeat r; stage s runs item t − s at iteration t, for M·R + S − 1 iterations. The
first and last S − 1 iterations leave some stages idle: the bubble, (S − 1) / (R·M + S − 1).

Every iteration all stages run at once: the stage function is `vmap`ped over the stage dimension
with `pipeline` as its SPMD axis, so each pipeline device computes its own stage. Stage outputs
move to the next stage with a `ppermute` (in a `shard_map` manual only over `pipeline`); the last
stage's output travels to stage 0, which keeps a buffer of every microbatch's activation and reads
the next work item from it. Bubble slots compute on zeros: their inputs are masked, so whatever
they hold (tests fill them with NaN) reaches neither results nor gradients. The backward pass is
autodiff through the `lax.scan` over iterations (GPipe: all microbatches' residuals are kept).

The model families do not know about any of this: `paxlike.models.layers.scan_layers` runs the
schedule when `use(spec)` is active (the trainer's pipeline gradient schedule, paxlike/step.py).
Outside the stages (embedding, head, loss) the batch's rows are split over `pipeline` too (every
rules preset puts it in `batch`); inside a stage the rules drop it (`stage_rules`).
Weights keep the logical layer order [L, ...] (so checkpoints do too), with 'layers' split over
`pipeline`; with R > 1 the step regroups them to [S, R, K, ...], which moves weights between
pipeline devices once per step (forward) and moves their gradients back.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from paxlike import sharding
from paxlike.errors import UserError

AXIS = "pipeline"
FSDP_GATHER = ("per_iteration", "per_step")


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    stages: int                     # S: the size of the `pipeline` mesh axis
    microbatches: int               # M: a multiple of S
    repeats: int = 1                # R: circular repeats (each stage holds R groups of layers)
    # per_iteration: weights sharded over the batch (FSDP) axes are gathered where each iteration
    # uses them (least memory); per_step: gathered once before the schedule (least traffic).
    fsdp_gather: str = "per_iteration"
    # Tests only: the value bubble slots hold before they are masked (NaN proves they never leak).
    bubble_fill: float | None = None

    @property
    def iterations(self) -> int:
        return self.microbatches * self.repeats + self.stages - 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.microbatches, self.repeats)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Share of stage-iterations that are idle: (S − 1) / (R·M + S − 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def problems(stages: int, microbatches: int, repeats: int, num_layers: int,
             fsdp_gather: str = "per_iteration") -> list[str]:
    """What keeps (S, M, R) from pipelining `num_layers` stacked layers, each naming the fix."""
    out = []
    if repeats < 1:
        out.append(f"pipeline_repeats={repeats} must be >= 1")
    elif stages == 1 and repeats > 1:
        out.append(f"pipeline_repeats={repeats} needs mesh.pipeline > 1 (repeats are passes of a "
                   f"microbatch around the pipeline stages); set pipeline_repeats=1")
    if fsdp_gather not in FSDP_GATHER:
        out.append(f"pipeline_fsdp_gather={fsdp_gather!r}; choose one of {list(FSDP_GATHER)}")
    if stages > 1 and repeats >= 1:
        if microbatches % stages:
            out.append(f"microbatches={microbatches} must be a multiple of mesh.pipeline={stages} "
                       f"(every stage needs a microbatch in flight); set microbatches to "
                       f"{stages * max(1, -(-microbatches // stages))}")
        if num_layers % (stages * repeats):
            out.append(f"the model stacks {num_layers} layer blocks, which mesh.pipeline={stages} × "
                       f"pipeline_repeats={repeats} = {stages * repeats} does not divide; change "
                       f"model.num_layers or the pipeline sizes")
    return out


def checked_spec(stages: int, microbatches: int, repeats: int, num_layers: int,
                 fsdp_gather: str = "per_iteration") -> PipelineSpec | None:
    """The schedule for `num_layers` stacked layers (None when stages == 1); UserError listing
    every `problems` entry when it cannot be built. The trainer and the planner both call it."""
    found = problems(stages, microbatches, repeats, num_layers, fsdp_gather)
    if found:
        raise UserError("invalid pipeline: " + "; ".join(found))
    return PipelineSpec(stages, microbatches, repeats, fsdp_gather) if stages > 1 else None


_ACTIVE: contextvars.ContextVar[PipelineSpec | None] = contextvars.ContextVar(
    "paxlike_pipeline", default=None)


@contextlib.contextmanager
def use(spec: PipelineSpec | None):
    """`scan_layers` calls inside the block run the pipeline schedule of `spec` (None: plain)."""
    token = _ACTIVE.set(spec)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> PipelineSpec | None:
    return _ACTIVE.get()


def to_microbatches(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...]. Microbatch i takes rows i, i+m, i+2m…: every device keeps its own
    rows when the batch is split over devices, so no resharding happens."""
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def from_microbatches(x: jax.Array) -> jax.Array:
    """The inverse of `to_microbatches`: [m, B/m, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _row_groups(batch: int) -> tuple[tuple[int, ...], int]:
    """How the active rules split `batch` rows outside the stages: (sizes of the batch mesh axes
    in rule order, the position of `pipeline` among them or -1)."""
    axes = sharding.active_axes("batch")
    mesh = sharding.active_rules()[0] if axes else None
    sizes = tuple(mesh.shape[a] for a in axes)
    return sizes, axes.index(AXIS) if AXIS in axes else -1


def split_rows(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...] for the schedule, keeping rows on their devices. Outside the
    stages the rows are split over the batch axes including `pipeline`; inside, over the others
    only. So the rows of each group of devices that differ only in their pipeline index are
    pooled (their stage buffers gather them over `pipeline`), and microbatch i takes the pooled
    rows i, i+m, i+2m… of every group. Without other batch axes that is `to_microbatches`."""
    sizes, at = _row_groups(x.shape[0])
    if at < 0:
        return to_microbatches(x, m)
    rows, rest = x.shape[0] // np.prod(sizes, dtype=int), x.shape[1:]
    blocks = x.reshape(*sizes, rows, *rest)
    n = len(sizes)
    blocks = jnp.moveaxis(blocks, at, n - 1)               # [..others, S, rows, ...]
    others = sizes[:at] + sizes[at + 1:]
    pooled = blocks.reshape(*others, sizes[at] * rows // m, m, *rest)
    micro = jnp.moveaxis(pooled, n, 0)                      # [m, ..others, pooled/m, ...]
    return micro.reshape(m, x.shape[0] // m, *rest)


def join_rows(x: jax.Array, batch: int) -> jax.Array:
    """The inverse of `split_rows`: [m, B/m, ...] -> [B, ...]."""
    sizes, at = _row_groups(batch)
    if at < 0:
        return from_microbatches(x)
    m, rest = x.shape[0], x.shape[2:]
    rows, n = batch // np.prod(sizes, dtype=int), len(sizes)
    others = sizes[:at] + sizes[at + 1:]
    micro = x.reshape(m, *others, sizes[at] * rows // m, *rest)
    pooled = jnp.moveaxis(micro, 0, n)                      # [..others, pooled/m, m, ...]
    blocks = pooled.reshape(*others, sizes[at], rows, *rest)
    return jnp.moveaxis(blocks, n - 1, at).reshape(batch, *rest)


def _pin(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    rules = sharding.active_rules()
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(rules[0], spec))


def stage_rules(rules: sharding.Rules) -> dict[str, tuple[str, ...]]:
    """The rules inside a stage: every logical name without `pipeline`, which is the stage
    dimension there. (Outside the pipeline the batch is split over `pipeline` too, so that the
    embedding, output head and loss are not computed S times.)"""
    return {name: tuple(a for a in axes if a != AXIS) for name, axes in rules.items()}


def _pin_stages(x: jax.Array, leading: int, names) -> jax.Array:
    """Constrains `leading` dims (the first over stages) followed by a [B, ...] activation named
    `names`."""
    active_rules = sharding.active_rules()
    if active_rules is None:
        return x
    mesh, rules = active_rules
    rest = sharding.logical_to_spec(names, None, stage_rules(rules), mesh, "pipeline activation")
    return _pin(x, PartitionSpec(AXIS, *([None] * (leading - 1)), *rest))


def _pin_microbatched(b: jax.Array) -> jax.Array:
    """[M, B/M, ...] batch inputs (positions, masks): rows split as inside a stage (not over
    `pipeline`: every stage may read any microbatch), the other dimensions left to the
    partitioner."""
    active_rules = sharding.active_rules()
    if active_rules is None:
        return b
    mesh, rules = active_rules
    rows = sharding.logical_to_spec(("batch",), b.shape[1:2], stage_rules(rules), mesh,
                                    "pipeline batch input")
    rest = [PartitionSpec.UNCONSTRAINED] * (b.ndim - 2)
    return _pin(b, PartitionSpec(None, *rows, *rest))


def _shift(x: jax.Array, stages: int) -> jax.Array:
    """Stage s's slice goes to stage s + 1 (the last to stage 0): a `ppermute` over `pipeline`."""
    if sharding.active_rules() is None:
        return jnp.roll(x, 1, axis=0)
    mesh = sharding.active_rules()[0]
    perm = [(i, (i + 1) % stages) for i in range(stages)]
    return jax.shard_map(lambda b: jax.lax.ppermute(b, AXIS, perm), mesh=mesh,
                         in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(AXIS),
                         axis_names=frozenset({AXIS}), check_vma=False)(x)


def stage_weights(state, spec: PipelineSpec):
    """Stacked layer variables [L, ...] (an `nnx.State`) -> [S, R, K, ...], the stage dimension on
    `pipeline`. With `fsdp_gather="per_step"` the other dimensions drop the batch (FSDP) axes: the
    weights are gathered here, once per step."""
    s, r = spec.stages, spec.repeats
    rules = sharding.active_rules()
    batch_axes = set(sharding.active_axes("batch"))

    def one(variable):
        w = variable[...]
        w = jnp.swapaxes(w.reshape(r, s, w.shape[0] // (r * s), *w.shape[1:]), 0, 1)
        if rules is not None:
            mesh, table = rules
            names = sharding.variable_names(variable)
            full = list(sharding.logical_to_spec(names, None, table, mesh, "pipelined weight"))
            rest = (full + [None] * len(names))[1:len(names)]
            if spec.fsdp_gather == "per_step":
                rest = [_without(entry, batch_axes) for entry in rest]
            w = _pin(w, PartitionSpec(AXIS, None, None, *rest))
        return variable.replace(w)
    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _without(entry, axes):
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a not in axes)
    return kept[0] if len(kept) == 1 else (kept or None)


def run(stage_fn: Callable, weights, x: jax.Array, batch_inputs, spec: PipelineSpec,
        act_names=("batch", "length", "act_embed")):
    """The circular GPipe schedule.

    stage_fn(weights [K, ...], x [b, ...], batch_inputs (one microbatch's), repeat, microbatch,
             stage) -> (x, per-layer outputs [K, ...])
    weights: [S, R, K, ...] (`stage_weights`); x: [B, ...], split into M microbatches by
    `split_rows`, like every array of `batch_inputs`.
    Returns (x after every layer [B, ...], per-layer outputs [M, R·S·K, ...] in layer order).
    """
    S, M, R = spec.stages, spec.microbatches, spec.repeats
    n_items = M * R
    micro = split_rows(x, M)
    # Every stage keeps a buffer of all microbatches (the embedded batch, its rows gathered over
    # `pipeline`); only stage 0's is read, and written with the last stage's outputs.
    micro = _pin_stages(jnp.broadcast_to(micro[None], (S, *micro.shape)), 2, act_names)
    batch_inputs = jax.tree.map(lambda b: _pin_microbatched(split_rows(b, M)), batch_inputs)
    stage_ids = jnp.arange(S)
    fill = 0.0 if spec.bubble_fill is None else spec.bubble_fill
    shifted = _pin_stages(jnp.full((S, *micro.shape[2:]), fill, x.dtype), 1, act_names)

    def write_back(buffer, shifted, t):
        # shifted[0] is the last stage's output of iteration t - 1: work item t - S.
        item = t - S
        valid = (item >= 0) & (item < n_items)
        m = jnp.clip(item, 0, n_items - 1) % M
        old = jax.lax.dynamic_index_in_dim(buffer, m, axis=1, keepdims=False)
        new = jnp.where(valid, shifted, old)
        return jax.lax.dynamic_update_index_in_dim(buffer, new, m, axis=1)

    def mask(v, valid):
        return jnp.where(valid.reshape(valid.shape + (1,) * (v.ndim - 1)), v, jnp.zeros_like(v))

    active_rules = sharding.active_rules()
    if active_rules is not None:
        mesh, rules = active_rules
        inner = stage_fn

        def stage_fn(*args):
            with sharding.use_rules(mesh, stage_rules(rules)):
                return inner(*args)
    one_stage = jax.vmap(stage_fn, in_axes=(0, 0, None, 0, 0, 0),
                         spmd_axis_name=AXIS if active_rules else None)

    def iteration(carry, t):
        buffer, shifted = carry
        buffer = write_back(buffer, shifted, t)
        item = t - stage_ids                                   # [S]
        valid = (item >= 0) & (item < n_items)
        safe = jnp.clip(item, 0, n_items - 1)
        repeat, microbatch = safe // M, safe % M
        first = jax.lax.dynamic_index_in_dim(buffer, t % M, axis=1, keepdims=False)
        if spec.bubble_fill is not None:
            first = jnp.where(t < n_items, first, jnp.full_like(first, fill))
        x_in = jnp.where((stage_ids == 0).reshape((S,) + (1,) * (first.ndim - 1)), first, shifted)
        # Bubble slots compute on zeros: garbage (or NaN) there would otherwise reach the weight
        # gradients through 0 · garbage in the backward pass.
        x_in = mask(x_in, valid)
        out, per_layer = one_stage(weights, x_in, batch_inputs, repeat, microbatch, stage_ids)
        per_layer = jax.tree.map(lambda v: mask(v, valid), per_layer)
        return (buffer, _shift(out, S)), per_layer

    (buffer, shifted), per_layer = jax.lax.scan(iteration, (micro, shifted),
                                                jnp.arange(spec.iterations))
    buffer = write_back(buffer, shifted, spec.iterations)
    # Back to the rows' layout outside the stages (split over `pipeline` too) before the head:
    # left to the partitioner, the head's backward pass gathers the whole batch on every device.
    x_out = sharding.constrain(join_rows(buffer[0], x.shape[0]), act_names)
    return x_out, jax.tree.map(lambda v: _by_layer(v, spec), per_layer)


def _by_layer(v: jax.Array, spec: PipelineSpec) -> jax.Array:
    """[iterations, S, K, ...] per-iteration stage outputs -> [M, R·S·K, ...]: microbatch m's
    layer r·S·K + s·K + k ran on stage s at iteration r·M + m + s."""
    S, M, R = spec.stages, spec.microbatches, spec.repeats
    m, r, s = np.meshgrid(np.arange(M), np.arange(R), np.arange(S), indexing="ij")
    picked = v[r * M + m + s, s]                               # [M, R, S, K, ...]
    return picked.reshape(M, R * S * v.shape[2], *v.shape[3:])
