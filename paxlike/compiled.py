"""Compiling a plan's train step for a real TPU topology on this CPU machine (libtpu, no TPU
attached), and reading back per-chip memory and collectives beside the cost model's prediction.
Used by the `paxlike.aot` and `paxlike.plan --verify` command lines and by the tests.

This is the compiler's side of the planner: it builds the trainer. The planner itself
(`paxlike.planner`) is arithmetic and imports no trainer."""

from __future__ import annotations

import copy
import os
import re
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles may share a machine

from paxlike.errors import UserError  # noqa: E402
from paxlike.mesh import MESH_AXES, build_mesh  # noqa: E402
from paxlike.planner import cost, fleets, hlo  # noqa: E402
from paxlike.trainer import Trainer  # noqa: E402


def topology_devices(name: str, num_slices: int = 1):
    """The devices of a TPU topology, from libtpu (no TPU needed)."""
    if num_slices < 1:
        raise UserError(f"--num_slices={num_slices} must be >= 1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it
        raise UserError(f"jax has no topologies module: {e}") from e
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise UserError("AOT compiles need libtpu: pip install 'paxlike[tpu]'") from e
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            num_slices=num_slices)
    except Exception as e:  # noqa: BLE001 - libtpu reports bad names in many ways
        raise UserError(f"--topology={name!r} is not a TPU topology libtpu knows "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"examples: v5e:4x4, v5p:4x4x4, v6e:8x8") from e
    return list(topo.devices)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {k.removesuffix("_size_in_bytes"): int(getattr(m, k)) for k in keys}


def _bytes_in(message: str) -> int:
    """The 'required' figure of an XLA out-of-memory message, e.g. '... temporaries (2.06T)'."""
    m = re.search(r"required[^(]*\(([\d.]+)([KMGT]?)\)", message)
    if not m:
        return 0
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def compile_plan(cfg, devices, plan=None) -> dict:
    """Compiles the train step for `plan` (None: the config as it is) on `devices`.

    Returns the report: memory analysis, collectives, prediction, compile time."""
    cfg = copy.deepcopy(cfg)
    if plan is not None:
        plan.apply(cfg)
    else:
        plan = cost.Plan.make({a: cfg.mesh[a] for a in MESH_AXES}, cfg.mesh.dcn.to_dict(),
                              cfg.sharding, cfg.microbatches, cfg.model.remat,
                              cfg.pipeline_repeats, cfg.pipeline_fsdp_gather)
    mesh = build_mesh(plan.sizes, plan.dcn_sizes, devices)
    resolved = cost.Plan.make(dict(mesh.shape), plan.dcn_sizes, plan.preset, plan.microbatches,
                              plan.remat, plan.pipeline_repeats, plan.pipeline_fsdp_gather)
    fleet = fleets.fleet_for_devices(devices)
    backend = devices[0].platform
    # A model family without a planner profile is still compiled and measured, just without a
    # prediction beside it.
    predicted = None
    if cost.has_profile(cfg):
        try:
            predicted = cost.estimate(cfg, resolved, fleet, backend)
        except UserError:   # a layout the cost model does not price (e.g. some MoE dispatch)
            predicted = None
    start = time.perf_counter()
    try:
        compiled = Trainer(cfg, mesh).compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is ours
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, oom = None, str(e).splitlines()[0]
    seconds = time.perf_counter() - start
    if compiled is None:
        # The TPU compiler refuses programs that exceed HBM; its message has the figure.
        memory = {"error": oom, "temp": _bytes_in(oom)}
        per_device, found, kernels, by_axes = memory["temp"], {}, 0, {}
    else:
        memory = _memory(compiled)
        per_device = (memory["argument"] + memory["output"] + memory["temp"] - memory["alias"])
        text = compiled.as_text()   # printed once: megabytes for a real model
        found = hlo.collectives(text, len(devices))
        by_axes = hlo.volume_by_axes(text, len(devices))
        # Pallas kernels compiled by Mosaic (TPU): custom calls in the program text.
        kernels = text.count('custom_call_target="tpu_custom_call"')
    return {
        "fleet": fleet.name,
        "plan": {"mesh": dict(resolved.mesh), "dcn": dict(resolved.dcn), "preset": plan.preset,
                 "microbatches": plan.microbatches, "remat": plan.remat,
                 "pipeline_repeats": plan.pipeline_repeats,
                 "pipeline_fsdp_gather": plan.pipeline_fsdp_gather},
        "bytes_per_device": int(per_device),
        "hbm_bytes": int(fleet.device.hbm_bytes),
        "fits": compiled is not None and per_device <= fleet.device.hbm_bytes,
        "memory_analysis": memory,
        # dcn_volume: the part moved between TPU slices (megascale transfers, planner/hlo.py)
        "collectives": {k: {"count": v["count"], "bytes": int(v["bytes"]),
                            "volume": int(v["volume"]), "dcn_volume": int(v["dcn_volume"])}
                        for k, v in found.items() if v["count"]},
        # full-buffer volume by the mesh axes of the group ("?" where the compiler prints the
        # groups unnamed: TPU, and some XLA:CPU loops)
        "collective_axes": {k: int(v) for k, v in by_axes.items()},
        "predicted": None if predicted is None else {
            "bytes_per_device": int(predicted.bytes_per_device),
            "memory": {k: int(v) for k, v in predicted.memory.items()},
            "collective_volume": {k: int(v) for k, v in predicted.comm_by_kind.items()},
            "comm_bytes": {k: int(v) for k, v in predicted.comm.items()},
            "volume_by_axes": {k: int(v) for k, v in predicted.volume_by_axes.items()},
            "step_time_s": predicted.step_time_s, "mfu": predicted.mfu},
        "mosaic_kernels": kernels,
        "compile_s": seconds,
    }
