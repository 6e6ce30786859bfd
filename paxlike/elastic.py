"""Elastic restart: resuming a checkpoint on more or fewer devices or processes.

What stays fixed across a restart is what defines the training run: the global batch
(`batch_size` sequences per step) and the data order (global batch k is the same rows whatever
the mesh; paxlike/data/pipeline.py). What may change is how a step is laid out on the devices:
the mesh (`mesh.fsdp=-1` takes whatever devices there are) and the number of microbatches.

Every checkpoint records the layout that wrote it (`layout`): devices, processes, mesh sizes,
microbatches, the rows each device holds of one microbatch (batch_size / microbatches / the
number of ways the batch is split), the `microbatches` the config asked for, and the rows per
device the run was planned with. The activation memory of a step grows with those rows, so:

  * Same `microbatches` in the config as when the checkpoint's run was planned (the same command
    on another fleet): the microbatches follow the layout. paxlike takes the fewest that divide
    batch_size, split evenly over the new batch axes (a multiple of mesh.pipeline, if any) and
    keep the rows per device per microbatch at most the planned number. A run that loses half
    its devices doubles its microbatches and goes back when the devices return; the plan is
    carried from checkpoint to checkpoint, so repeated restarts do not drift.
  * A different `microbatches` in the config: the user chose; it is used as given and becomes
    the new plan. `elastic_microbatches=False` always uses the config's value (and so does
    `mesh.auto`, whose planner chooses the microbatches for the devices present).

Pure functions; paxlike/loop.py calls them from `prepare`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from paxlike.errors import UserError

_EPS = 1e-9   # rows are ratios of small integers; compare them with a hair of slack


def batch_ways(mesh_shape: Mapping[str, int], rules: Mapping[str, tuple[str, ...]],
               pipeline_stages: int = 1) -> int:
    """How many ways one microbatch is split over devices: the mesh axes the `batch` rule uses
    (inside a pipeline stage, all but `pipeline`, which holds the stages there)."""
    axes = [a for a in rules["batch"] if mesh_shape.get(a, 1) > 1
            and not (pipeline_stages > 1 and a == "pipeline")]
    return math.prod(mesh_shape[a] for a in axes)


def rows_per_device(batch_size: int, microbatches: int, ways: int) -> float:
    return batch_size / microbatches / ways


def layout(*, devices: int, processes: int, mesh_shape: Mapping[str, int], microbatches: int,
           batch_size: int, ways: int, asked: int | None = None,
           planned_rows: float | None = None) -> dict:
    """What a checkpoint records about the layout that wrote it (JSON). `asked`: the config's
    microbatches (default: `microbatches`); `planned_rows`: the plan (default: this layout's)."""
    rows = rows_per_device(batch_size, microbatches, ways)
    return {"devices": devices, "processes": processes,
            "mesh": {a: int(s) for a, s in mesh_shape.items()},
            "microbatches": microbatches, "batch_size": batch_size,
            "rows_per_device_microbatch": rows,
            "asked_microbatches": microbatches if asked is None else asked,
            "planned_rows_per_device_microbatch": rows if planned_rows is None else planned_rows}


def describe(saved: Mapping) -> str:
    """E.g. '4 processes x 2 devices, mesh fsdp=8, 1 microbatch of 2 rows per device'."""
    devices, processes = saved["devices"], saved["processes"]
    who = (f"{processes} processes x {devices // processes} devices" if processes > 1 else
           f"{devices} device{'s' if devices > 1 else ''}")
    mesh = " ".join(f"{a}={s}" for a, s in saved["mesh"].items() if s > 1) or "single device"
    m, rows = saved["microbatches"], saved["rows_per_device_microbatch"]
    return (f"{who}, mesh {mesh}, {m} microbatch{'es' if m > 1 else ''} of {rows:g} "
            f"row{'s' if rows != 1 else ''} per device")


def fewest_microbatches(batch_size: int, ways: int, budget: float,
                        multiple_of: int = 1) -> int | None:
    """The fewest microbatches that divide `batch_size` into parts split evenly `ways` ways,
    are a multiple of `multiple_of`, and leave at most `budget` rows per device; None if none."""
    for m in range(1, batch_size + 1):
        if batch_size % m or m % multiple_of or (batch_size // m) % ways:
            continue
        if rows_per_device(batch_size, m, ways) <= budget + _EPS:
            return m
    return None


@dataclasses.dataclass(frozen=True)
class Resume:
    microbatches: int          # what this run uses
    layout: dict               # what this run's checkpoints record
    message: str | None        # the one line saying what changed, or None when nothing did


def plan_resume(saved: Mapping | None, *, step: int | None, devices: int, processes: int,
                mesh_shape: Mapping[str, int], batch_size: int, microbatches: int, ways: int,
                elastic: bool, multiple_of: int = 1) -> Resume:
    """The microbatches for this run and its layout, given the config's `microbatches` and the
    layout that wrote the checkpoint it resumes (`saved`; None for a new run): the rule in this
    module's docstring."""
    def own(chosen: int, planned: float | None) -> dict:
        return layout(devices=devices, processes=processes, mesh_shape=mesh_shape,
                      microbatches=chosen, batch_size=batch_size, ways=ways, asked=microbatches,
                      planned_rows=planned)

    if saved is None:
        return Resume(microbatches, own(microbatches, None), None)
    chosen, planned, why = microbatches, None, ""
    if elastic and microbatches == saved.get("asked_microbatches", saved["microbatches"]):
        planned = saved.get("planned_rows_per_device_microbatch",
                            saved["rows_per_device_microbatch"])
        found = fewest_microbatches(batch_size, ways, planned, multiple_of)
        if found is None:
            multiples = f" in multiples of mesh.pipeline={multiple_of}" if multiple_of > 1 else ""
            raise UserError(
                f"resuming step {step} (written on {describe(saved)}) on {devices} devices: no "
                f"number of microbatches splits batch_size={batch_size} evenly over the {ways} "
                f"ways the mesh splits the batch{multiples}; change the mesh sizes or batch_size, "
                f"or set microbatches yourself")
        chosen = found
        if chosen != saved["microbatches"]:
            why = (f" (microbatches {'raised' if chosen > saved['microbatches'] else 'lowered'} "
                   f"to keep at most {planned:g} rows per device per microbatch)")
    elif not elastic:
        why = f" (elastic_microbatches=False: microbatches={microbatches} as configured)"
    elif microbatches != saved["microbatches"]:
        why = f" (microbatches={microbatches} as configured)"
    new = own(chosen, planned)
    if any(saved.get(k) != new[k] for k in ("devices", "processes", "mesh")):
        message = (f"elastic restart: checkpoints written on {describe(saved)} -> now "
                   f"{describe(new)}{why}; the global batch ({batch_size} sequences) and the "
                   f"data order are unchanged")
    elif chosen != microbatches:
        message = (f"microbatches={chosen}, not the config's {microbatches}: at most {planned:g} "
                   f"rows per device per microbatch, as planned when the checkpoints were "
                   f"written; set elastic_microbatches=False to use the config's value")
    else:
        message = None
    return Resume(chosen, new, message)


def mesh_error(error: UserError, saved: Mapping | None, step: int | None,
               devices: int) -> UserError:
    """The mesh's own error, plus, when the checkpoint was written on another device count,
    what changed and what to set."""
    if saved is None or saved.get("devices") == devices:
        return error
    mesh = " ".join(f"mesh.{a}={s}" for a, s in saved["mesh"].items() if s > 1) or "all 1"
    return UserError(
        f"{error}. The checkpoint at step {step} was written on {saved['devices']} devices "
        f"({mesh}) and this run has {devices}: set mesh sizes whose product is {devices}, "
        f"e.g. keep one axis at -1 (--config.mesh.fsdp=-1) so that it takes the devices there are")
