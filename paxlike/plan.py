"""Command line: choose mesh plans for an experiment on a fleet, before spending any pod hours.

    python -m paxlike.plan --config=experiments/transformer.py:7b --fleet=v5p-128 [--top=5] [--json]
        [--verify=N]

Prints the best plans ranked by predicted step time: mesh, sharding preset, microbatches, remat,
memory per device, communication per step by mesh axis and link, step time, MFU, and the binding
constraint. An infeasible request exits with status 1, says why, and names the smallest fleet of
the same kind that fits. `--verify=N` (TPU fleets) compiles the best N plans with the real TPU
compiler on this machine, in rank order, until one fits HBM, and names it: the recommendation is
then the compiler's word, not only the model's (exit 1 when none of the N fits).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning is arithmetic: never grab an accelerator

from absl import flags  # noqa: E402

from paxlike import cli  # noqa: E402
from paxlike.errors import UserError  # noqa: E402

_FLEET = flags.DEFINE_string("fleet", None, "Fleet to plan for, e.g. v5p-128, v5e-16, "
                             "2xv5p-256 (slices), 8xH100, 4x8xH100 (nodes x GPUs), cpu-8.")
_TOP = flags.DEFINE_integer("top", 5, "How many plans to show.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
_DCN_FSDP = flags.DEFINE_bool("allow_dcn_fsdp", False, "Let the fsdp axis cross slices / nodes "
                              "(by default only the data axis uses DCN).")
_VERIFY = flags.DEFINE_integer("verify", 0, "TPU fleets: compile up to this many of the best plans "
                               "with the TPU compiler (libtpu, no TPU needed), best first, until "
                               "one fits HBM.")


def verify(cfg, fleet, plans, n: int) -> dict[int, dict]:
    """Compiles plans[:n] for the fleet's real TPU topology, best first, until one fits HBM.
    Returns {rank index: {"bytes_per_device", "fits", "compile_s"}} for the plans compiled."""
    from paxlike.compiled import compile_plan, topology_devices  # the trainer: only to compile
    if not fleet.aot_topology:
        raise UserError(f"--verify compiles with the TPU compiler; {fleet.name} is not a TPU fleet")
    devices = topology_devices(fleet.aot_topology, fleet.granules)
    checked = {}
    for i, c in enumerate(plans[:n]):
        print(f"compiling plan {i + 1}/{min(n, len(plans))} ({c.plan.describe()}) for "
              f"{fleet.aot_topology} x{fleet.granules} ...", file=sys.stderr, flush=True)
        report = compile_plan(cfg, devices, c.plan)
        checked[i] = {"bytes_per_device": report["bytes_per_device"], "fits": report["fits"],
                      "compile_s": round(report["compile_s"], 1)}
        print(f"  {report['compile_s']:.0f} s: {_gib(report['bytes_per_device'])} GiB per chip "
              f"compiled ({_gib(c.bytes_per_device)} predicted), "
              f"{'fits' if report['fits'] else 'does NOT fit'} {_gib(fleet.device.hbm_bytes)} GiB",
              file=sys.stderr, flush=True)
        if report["fits"]:
            break
    return checked


def plan_json(c) -> dict:
    """One plan in the documented JSON form."""
    p = c.plan
    return {"mesh": {a: s for a, s in p.mesh}, "dcn": {a: s for a, s in p.dcn},
            "preset": p.preset, "microbatches": p.microbatches, "remat": p.remat,
            "pipeline_repeats": p.pipeline_repeats, "pipeline_fsdp_gather": p.pipeline_fsdp_gather,
            "bytes_per_device": int(c.bytes_per_device),
            "comm_bytes": {k: int(v) for k, v in sorted(c.comm.items())},
            "step_time_s": c.step_time_s, "mfu": c.mfu, "binding": c.binding,
            "time_parts_s": dict(c.time_parts), "why": c.reason}


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


def main(cfg):
    from paxlike import config as config_lib
    from paxlike.planner import fleets, search
    if not _FLEET.value:
        raise UserError("--fleet is required, e.g. --fleet=v5p-128")
    if _TOP.value < 1:
        raise UserError(f"--top={_TOP.value} must be >= 1")
    if _VERIFY.value < 0:
        raise UserError(f"--verify={_VERIFY.value} must be >= 0")
    config_lib.validate(cfg)
    fleet = fleets.parse_fleet(_FLEET.value)
    start = time.perf_counter()
    result = search.search(cfg, fleet, allow_dcn_fsdp=_DCN_FSDP.value)
    elapsed = time.perf_counter() - start
    if not result.plans:
        print(f"paxlike: {search.infeasible_message(cfg, result)}", file=sys.stderr)
        sys.exit(1)
    checked = verify(cfg, fleet, result.plans, _VERIFY.value) if _VERIFY.value else {}
    verified = next((i for i, r in checked.items() if r["fits"]), None)
    shown = max(_TOP.value, max(checked, default=-1) + 1)
    if _JSON.value:
        plans = [dict(plan_json(c), **({"compiled": checked[i]} if i in checked else {}))
                 for i, c in enumerate(result.plans[:shown])]
        out = {"plans": plans}
        if checked:
            out["verified"] = verified
        print(json.dumps(out, indent=1))
    else:
        name = cli.config_argument()
        print(f"{name} on {fleet.name}: {fleet.num_devices} x {fleet.device.name} "
              f"({_gib(fleet.device.hbm_bytes)} GiB, {fleet.device.peak_flops / 1e12:.0f} "
              f"TFLOP/s bf16 each), {fleet.granules} slice/node(s); {len(result.plans)} "
              f"feasible of {result.considered} plans considered in {elapsed:.2f} s")
        print(table(result, shown))
        print("step time = max(compute, weight traffic) + exposed activation traffic + DCN "
              "traffic; compute at the fitted achievable fraction of peak with HBM floors "
              "(docs/planner.md, \"Step time\").")
        if checked and verified is not None:
            print(f"verified by the TPU compiler: plan {verified + 1} "
                  f"({_gib(checked[verified]['bytes_per_device'])} GiB per chip compiled)")
    if checked and verified is None:
        print(f"paxlike: none of the best {len(checked)} plans fits HBM once compiled; try "
              f"--verify={len(checked) * 2} or a larger fleet", file=sys.stderr)
        sys.exit(1)


def run_cli():
    cli.run(main)


if __name__ == "__main__":
    run_cli()
