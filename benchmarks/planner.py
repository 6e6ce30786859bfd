"""Planner report: top plans for transformer 1b and 7b on v5e-16, v5p-128 and 2xv5p-256, the
predicted vs compiled (TPU compiler, on this CPU machine) memory of each top plan, and the wall
time of planning and of the AOT compile. Writes benchmarks/planner.md.

    python benchmarks/planner.py [--sizes=1b,7b] [--fleets=v5e-16,v5p-128,2xv5p-256] [--top=3]
                                 [--no_compile] [--out=benchmarks/planner.md]
    python benchmarks/planner.py --accuracy   # the test cases' ratios (docs/planner.md tables)

Needs libtpu (the `tpu` extra) for the compiles. Each compile of a full-size train step takes
minutes of CPU: expect tens of minutes for all six.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from paxlike.compiled import compile_plan, topology_devices  # noqa: E402
from paxlike.experiments import transformer  # noqa: E402
from paxlike.planner import fleets, search  # noqa: E402

GIB = 1024 ** 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accuracy():
    """Prints predicted / compiled memory and collective volume of the cases the tests check:
    tests/test_planner.py's CPU cases (8 emulated devices) and tests/test_aot.py's TPU cases."""
    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_planner

    from paxlike.planner import cost, hlo
    print("| CPU case | memory | collective volume |\n|---|---|---|")
    for name in test_planner.CPU_CASES:
        cfg, plan, compiled = test_planner._compiled_case(name)
        predicted = cost.estimate(cfg, plan, fleets.parse_fleet("cpu-8"), "cpu")
        m = compiled.memory_analysis()
        actual = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                  - m.alias_size_in_bytes)
        volume = sum(v["volume"] for v in hlo.collectives(compiled.as_text(), 8).values())
        print(f"| {name} | {predicted.bytes_per_device / actual:.3f} | "
              f"{sum(predicted.comm_by_kind.values()) / volume:.3f} |", flush=True)
    import test_aot
    print("\n| TPU case | memory | collective volume | compile s |\n|---|---|---|---|")
    for name, (topology, slices, mesh, dcn, batch, _) in {**test_aot.CASES,
                                                             **test_aot.BY_HAND}.items():
        cfg = test_aot.one_b_class(batch)
        plan = cost.Plan.make(mesh, dcn, "fsdp_tp", 1, cfg.model.remat)
        _tpu_row(f"{name} {plan.describe()}",
                 compile_plan(cfg, topology_devices(topology, slices), plan))
    # Pipelined cases: the stages across the 2 slices (the 7b one is too slow for the suite).
    for name in {**test_aot.PIPELINED, **test_aot.PIPELINED_BY_HAND}:
        cfg, topology, slices, plan = test_aot.pipelined_case(name)
        _tpu_row(f"pipelined {name} {plan.describe()}",
                 compile_plan(cfg, topology_devices(topology, slices), plan))


def _tpu_row(label: str, report: dict) -> None:
    volume = sum(v["volume"] for v in report["collectives"].values())
    print(f"| {label} | "
          f"{report['predicted']['bytes_per_device'] / report['bytes_per_device']:.3f} | "
          f"{sum(report['predicted']['collective_volume'].values()) / volume:.3f} | "
          f"{report['compile_s']:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1b,7b")
    parser.add_argument("--fleets", default="v5e-16,v5p-128,2xv5p-256")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "planner.md"))
    parser.add_argument("--accuracy", action="store_true",
                        help="print the test cases' predicted / compiled ratios instead")
    args = parser.parse_args()
    if args.accuracy:
        return accuracy()

    lines = ["# Planner report", "",
             f"Written by `python benchmarks/planner.py` on {platform.node()} "
             f"({os.cpu_count()} CPU cores, shared), jax {jax.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "Memory is per chip. *Compiled* is the TPU compiler's memory analysis (arguments + "
             "outputs + temporaries - aliased) of the full train step for the plan, compiled on "
             "this CPU machine for the real topology; ratios are predicted / compiled (collective "
             "volume: the full buffers moved, read from the optimized HLO). Step time and MFU "
             "are predictions of the step-time model (docs/planner.md, \"Step time against "
             "published measurements\": fitted on MaxText's v5p figures, within 15% on the "
             "held-out v5e table).", ""]
    summary = ["| size | fleet | planning s | top plan | predicted GiB | compiled GiB | "
               "ratio | collective volume ratio | compile s |",
               "|---|---|---|---|---|---|---|---|---|"]
    details = []
    for size in args.sizes.split(","):
        cfg = transformer.get_config(size)
        for name in args.fleets.split(","):
            fleet = fleets.parse_fleet(name)
            start = time.perf_counter()
            result = search.search(cfg, fleet)
            planning = time.perf_counter() - start
            details += [f"## {size} on {name} ({fleet.num_devices} x {fleet.device.name}, "
                        f"{fleet.granules} slice(s))", "",
                        f"{len(result.plans)} feasible of {result.considered} plans considered, "
                        f"planned in {planning:.2f} s.", ""]
            print(f"{size} {name}: planned in {planning:.2f} s, {len(result.plans)} feasible",
                  flush=True)
            if not result.plans:
                message = search.infeasible_message(cfg, result)
                details += [f"Infeasible: {message}.", ""]
                summary.append(f"| {size} | {name} | {planning:.2f} | infeasible | - | - | - | - "
                               f"| - |")
                continue
            details += ["| # | mesh | preset | microbatches | remat | GiB/chip | ICI GB | DCN GB | "
                        "step s | MFU | why |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for i, c in enumerate(result.plans[:args.top], 1):
                ici = sum(v for k, v in c.comm.items() if k.endswith("/ici")) / 1e9
                dcn = sum(v for k, v in c.comm.items() if k.endswith("/dcn")) / 1e9
                details.append(f"| {i} | {c.plan.describe()} | {c.plan.preset} | "
                               f"{c.plan.microbatches} | {c.plan.remat} | "
                               f"{c.bytes_per_device / GIB:.2f} | {ici:.1f} | {dcn:.1f} | "
                               f"{c.step_time_s:.3f} | {c.mfu:.1%} | {result.why(c)} |")
            details.append("")
            top = result.plans[0]
            compiled, ratio, volume_ratio, seconds = "-", "-", "-", "-"
            if not args.no_compile and fleet.aot_topology:
                devices = topology_devices(fleet.aot_topology, fleet.granules)
                report = compile_plan(cfg, devices, top.plan)
                compiled = f"{report['bytes_per_device'] / GIB:.2f}"
                ratio = f"{top.bytes_per_device / report['bytes_per_device']:.2f}"
                if not report["fits"]:
                    compiled += f" (exceeds {report['hbm_bytes'] / GIB:.0f} GiB HBM)"
                seconds = f"{report['compile_s']:.0f}"
                volume = sum(v["volume"] for v in report["collectives"].values())
                volume_ratio = f"{sum(top.comm_by_kind.values()) / volume:.2f}"
                details += [f"Top plan compiled for {fleet.aot_topology} x{fleet.granules} in "
                            f"{seconds} s: {compiled} GiB per chip compiled vs "
                            f"{top.bytes_per_device / GIB:.2f} predicted; collective volume "
                            f"{volume / 1e9:.2f} GB compiled vs "
                            f"{sum(top.comm_by_kind.values()) / 1e9:.2f} GB predicted.", ""]
                print(f"  compiled in {seconds} s: {compiled} GiB vs "
                      f"{top.bytes_per_device / GIB:.2f} predicted", flush=True)
            summary.append(f"| {size} | {name} | {planning:.2f} | {top.plan.describe()}, "
                           f"{top.plan.preset}, mb={top.plan.microbatches}, {top.plan.remat} | "
                           f"{top.bytes_per_device / GIB:.2f} | {compiled} | {ratio} | "
                           f"{volume_ratio} | {seconds} |")
            with open(args.out, "w") as f:   # keep what is done if a later compile is cut short
                f.write("\n".join(lines + summary + [""] + details) + "\n")
    with open(args.out, "w") as f:
        f.write("\n".join(lines + summary + [""] + details) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
