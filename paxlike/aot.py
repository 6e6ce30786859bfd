"""Command line: compile the full train step for a real TPU topology on this CPU machine.

    python -m paxlike.aot --config=experiments/transformer.py:1b --topology=v5p:4x4x4 \
        [--num_slices=2] [--plan=top|config] [--json]

With libtpu installed (the `tpu` extra) the TPU compiler runs without a TPU: the device mesh is
built from the topology's real devices in physical order (`paxlike.mesh.build_mesh`), the train
step is lowered with abstract, sharded arguments and compiled. Reported: per-chip memory from the
compiled memory analysis, collective counts and bytes from the optimized HLO, and the cost model's
prediction beside them. `--plan=top` (default) compiles the planner's best plan for the fleet the
topology forms; `--plan=config` compiles the config's own mesh / sharding / microbatches / remat.
Exit status 1 when the program does not fit the chip's memory (numbers printed), 2 on bad input.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")               # the topology needs no TPU attached

from absl import flags  # noqa: E402

from paxlike import cli  # noqa: E402
from paxlike.errors import UserError  # noqa: E402
from paxlike.compiled import compile_plan, topology_devices  # noqa: E402

_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4, v5p:4x4x4, "
                                "v6e:16x16, v4:4x4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN.")
_PLAN = flags.DEFINE_enum("plan", "top", ["top", "config"], "Compile the planner's top plan, or "
                          "the mesh / sharding / microbatches / remat in the config.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of text.")


def report_json(report: dict) -> dict:
    """The documented JSON form: topology, bytes_per_device, memory_analysis, collectives,
    predicted (which names the plan it predicts for)."""
    memory = dict(report["memory_analysis"], hbm=report["hbm_bytes"])
    predicted = (None if report["predicted"] is None else
                 dict(report["predicted"], plan=report["plan"], fleet=report["fleet"]))
    return {"topology": report["topology"], "bytes_per_device": report["bytes_per_device"],
            "memory_analysis": memory, "collectives": report["collectives"],
            "predicted": predicted}


def _text(report: dict) -> str:
    gib = 1024 ** 3
    m = report["memory_analysis"]
    p = report["predicted"]
    predicted_memory = ("no prediction (the planner does not model this family)" if p is None
                        else f"{p['bytes_per_device'] / gib:.3f} GiB predicted")
    if "error" in m:
        return (f"{report['topology']} ({report['fleet']}): the TPU compiler refused the train "
                f"step after {report['compile_s']:.1f} s: {m['error']}\n"
                f"plan: {report['plan']}; {predicted_memory} per chip")
    lines = [f"{report['topology']} ({report['fleet']}): compiled in {report['compile_s']:.1f} s",
             f"plan: {report['plan']}",
             f"memory per chip: {report['bytes_per_device'] / gib:.3f} GiB compiled "
             f"(arguments {m['argument'] / gib:.3f} + outputs {m['output'] / gib:.3f} + "
             f"temporaries {m['temp'] / gib:.3f} - aliased {m['alias'] / gib:.3f}), "
             f"{predicted_memory}; HBM {report['hbm_bytes'] / gib:.0f} GiB",
             "collectives (count per step, bytes sent per chip, full-buffer volume):"]
    for kind, v in report["collectives"].items():
        lines.append(f"  {kind:20s} {v['count']:6d}  {v['bytes'] / 1e6:10.1f} MB  "
                     f"{v['volume'] / 1e6:10.1f} MB")
    total = sum(v["volume"] for v in report["collectives"].values())
    if p is None:
        lines.append(f"  volume: {total / 1e6:.1f} MB compiled")
        return "\n".join(lines)
    lines.append(f"  volume: {total / 1e6:.1f} MB compiled, "
                 f"{sum(p['collective_volume'].values()) / 1e6:.1f} MB predicted")
    lines.append(f"predicted step {p['step_time_s']:.3f} s, MFU {p['mfu']:.1%} (upper bound)")
    return "\n".join(lines)


def main(cfg):
    from paxlike import config as config_lib
    from paxlike.planner import fleets, search
    if not _TOPOLOGY.value:
        raise UserError("--topology is required, e.g. --topology=v5p:4x4x4")
    config_lib.validate(cfg)
    devices = topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    plan = None
    if _PLAN.value == "top":
        fleet = fleets.fleet_for_devices(devices)
        result = search.search(cfg, fleet, backend="tpu")
        if not result.plans:
            print(f"paxlike: {search.infeasible_message(cfg, result, 'tpu')}", file=sys.stderr)
            sys.exit(1)
        plan = result.plans[0].plan
    report = compile_plan(cfg, devices, plan)
    report = {"topology": _TOPOLOGY.value + (f" x{_NUM_SLICES.value} slices"
                                             if _NUM_SLICES.value > 1 else ""), **report}
    print(json.dumps(report_json(report), indent=1) if _JSON.value else _text(report))
    if not report["fits"]:
        gib = 1024 ** 3
        print(f"paxlike: the train step needs {report['bytes_per_device'] / gib:.2f} GiB per "
              f"chip but a chip has {report['hbm_bytes'] / gib:.0f} GiB", file=sys.stderr)
        sys.exit(1)


def run_cli():
    cli.run(main)


if __name__ == "__main__":
    run_cli()
