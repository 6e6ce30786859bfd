"""Command line: choose mesh plans for an experiment on a fleet, before spending any pod hours.

    python -m paxlike.plan --config=experiments/transformer.py:7b --fleet=v5p-128 [--top=5] [--json]

Prints the best plans ranked by predicted step time: mesh, sharding preset, microbatches, remat,
memory per device, communication per step by mesh axis and link, step time, MFU, and the binding
constraint. An infeasible request exits with status 1, says why, and names the smallest fleet of
the same kind that fits. `python -m paxlike.aot` then compiles a plan for the real TPU topology.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning is arithmetic: never grab an accelerator

from absl import app, flags  # noqa: E402

from paxlike import cli  # noqa: E402
from paxlike.errors import UserError  # noqa: E402

_FLEET = flags.DEFINE_string("fleet", None, "Fleet to plan for, e.g. v5p-128, v5e-16, "
                             "2xv5p-256 (slices), 8xH100, 4x8xH100 (nodes x GPUs), cpu-8.")
_TOP = flags.DEFINE_integer("top", 5, "How many plans to show.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
_DCN_FSDP = flags.DEFINE_bool("allow_dcn_fsdp", False, "Let the fsdp axis cross slices / nodes "
                              "(by default only the data axis uses DCN).")
_CONFIG = None


def plan_json(c) -> dict:
    """One plan in the documented JSON form."""
    p = c.plan
    return {"mesh": {a: s for a, s in p.mesh}, "dcn": {a: s for a, s in p.dcn},
            "preset": p.preset, "microbatches": p.microbatches, "remat": p.remat,
            "bytes_per_device": int(c.bytes_per_device),
            "comm_bytes": {k: int(v) for k, v in sorted(c.comm.items())},
            "step_time_s": c.step_time_s, "mfu": c.mfu}


def _gib(x: float) -> str:
    return f"{x / 1024 ** 3:.2f}"


def table(result, top: int) -> str:
    rows = [("#", "mesh", "preset", "mb", "remat", "GiB/dev", "ICI GB/step", "DCN GB/step",
             "step s", "MFU", "why")]
    for i, c in enumerate(result.plans[:top], 1):
        ici = sum(v for k, v in c.comm.items() if k.endswith("/ici"))
        dcn = sum(v for k, v in c.comm.items() if k.endswith("/dcn"))
        rows.append((str(i), c.plan.describe(), c.plan.preset, str(c.plan.microbatches),
                     c.plan.remat, _gib(c.bytes_per_device), f"{ici / 1e9:.2f}",
                     f"{dcn / 1e9:.2f}", f"{c.step_time_s:.3f}", f"{c.mfu:.1%}",
                     result.why(c)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    try:
        from paxlike import config as config_lib
        from paxlike.planner import fleets, search
        if not _FLEET.value:
            raise UserError("--fleet is required, e.g. --fleet=v5p-128")
        if _TOP.value < 1:
            raise UserError(f"--top={_TOP.value} must be >= 1")
        cfg = _CONFIG.value
        config_lib.validate(cfg)
        fleet = fleets.parse_fleet(_FLEET.value)
        start = time.perf_counter()
        result = search.search(cfg, fleet, allow_dcn_fsdp=_DCN_FSDP.value)
        elapsed = time.perf_counter() - start
        if not result.plans:
            print(f"paxlike: {search.infeasible_message(cfg, result)}", file=sys.stderr)
            sys.exit(1)
        if _JSON.value:
            print(json.dumps({"plans": [plan_json(c) for c in result.plans[:_TOP.value]]},
                             indent=1))
        else:
            name = cli.config_argument()
            print(f"{name} on {fleet.name}: {fleet.num_devices} x {fleet.device.name} "
                  f"({_gib(fleet.device.hbm_bytes)} GiB, {fleet.device.peak_flops / 1e12:.0f} "
                  f"TFLOP/s bf16 each), {fleet.granules} slice/node(s); {len(result.plans)} "
                  f"feasible of {result.considered} plans considered in {elapsed:.2f} s")
            print(table(result, _TOP.value))
            print("step time = max(compute at peak, ICI time, DCN time), link time = bytes / "
                  "bandwidth + latency per collective; communication is assumed to overlap "
                  "compute fully, so MFU is an upper bound.")
    except UserError as e:
        cli.fail(str(e))


def _parse_flags(argv):
    global _CONFIG
    parsed, _CONFIG = cli.parse_flags_with_config(argv)
    return parsed


def run_cli():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
