"""The planner's step-time model against MaxText's published measurements
(experiments/maxtext.py): the v5p table it is fitted on, the v5e and H100 tables held out, and, per
model, the planner's own top plan beside MaxText's recipe. Arithmetic only (no compile), a few
seconds per table.

    python benchmarks/step_time.py            # both tables, markdown (docs/planner.md)
    python benchmarks/step_time.py --fit      # refit the constants on the v5p table only
    python benchmarks/step_time.py --plans    # the planner's top plan vs the recipe, per model
    python benchmarks/step_time.py --compile  # ... and each top plan compiled for its TPU
                                              # topology (libtpu; ~20-60 s per compile)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paxlike.experiments import maxtext  # noqa: E402
from paxlike.planner import cost, fleets, search, steptime  # noqa: E402


def table(rows, label: str) -> float:
    """Prints one table; returns the largest relative MFU error."""
    print(f"\n| {label} | fleet | batch/chip | remat | tensor | published MFU | predicted MFU | "
          f"error | where the time goes |\n|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in rows:
        mfu, c = maxtext.predicted_mfu(r)
        error = mfu / r.mfu - 1
        worst = max(worst, abs(error))
        print(f"| {r.size} | {r.fleet} | {r.per_device_batch} | {r.remat} | {r.tensor} | "
              f"{r.mfu:.1%} | {mfu:.1%} | {error:+.1%} | {c.reason} |", flush=True)
    return worst


def fit():
    """Refits the three constants on the v5p rows (the v5e rows are not looked at)."""
    rms, worst, (eta, exposed, dcn) = steptime.fit(maxtext.fit_samples(maxtext.V5P))
    print(f"v5p fit: MXU_EFFICIENCY={eta} EXPOSED_ACTIVATION_TRAFFIC={exposed} "
          f"DCN_EFFICIENCY={dcn} (error on the v5p rows: RMS {rms:.1%}, largest {worst:.1%})")


def _models():
    """One recipe per (model, slice type): the search is per fleet, slices only add DCN."""
    seen = {}
    for r in maxtext.V5P + maxtext.V5E + maxtext.A3:
        if fleets.parse_fleet(r.fleet).granules == 1:
            seen.setdefault((r.size, r.fleet), r)
    return list(seen.values())


def plans(compile_them: bool = False):
    """Per model and fleet of the tables: the planner's top plan beside MaxText's recipe, and
    with `compile_them` the top plan compiled for the fleet's TPU topology."""
    print("\n| model | fleet | recipe: step s, MFU, GiB | top plan | step s, MFU, GiB | why |"
          + (" compiled GiB / HBM | compile s |" if compile_them else "")
          + "\n|---|---|---|---|---|---|" + ("---|---|" if compile_them else ""))
    for r in _models():
        cfg, fleet, plan = maxtext.recipe_plan(r)
        recipe = cost.estimate(cfg, plan, fleet)
        result = search.search(cfg, fleet)
        row = f"| {r.size} | {r.fleet} | {recipe.step_time_s:.2f}, {recipe.mfu:.1%}, " \
              f"{recipe.bytes_per_device / 2**30:.1f} | "
        if not result.plans:
            print(row + "none fits | - | - |" + (" - | - |" if compile_them else ""))
            continue
        top = result.plans[0]
        row += (f"{top.plan.describe()}, {top.plan.microbatches} mb, remat {top.plan.remat} | "
                f"{top.step_time_s:.2f}, {top.mfu:.1%}, {top.bytes_per_device / 2**30:.1f} | "
                f"{result.why(top)} |")
        if compile_them and not fleet.aot_topology:
            row += " - (no TPU compiler for this fleet) | - |"
        elif compile_them:
            from paxlike.compiled import compile_plan, topology_devices
            report = compile_plan(cfg, topology_devices(fleet.aot_topology, fleet.granules),
                                  top.plan)
            row += (f" {report['bytes_per_device'] / 2**30:.1f} / {report['hbm_bytes'] / 2**30:.0f}"
                    f"{'' if report['fits'] else ' (does not fit)'} | {report['compile_s']:.0f} |")
        print(row, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--plans", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.fit:
        return fit()
    if args.plans or args.compile:
        return plans(args.compile)
    print(f"Step-time model: MXU_EFFICIENCY={steptime.MXU_EFFICIENCY}, "
          f"EXPOSED_ACTIVATION_TRAFFIC={steptime.EXPOSED_ACTIVATION_TRAFFIC}, "
          f"DCN_EFFICIENCY={steptime.DCN_EFFICIENCY}")
    fitted = table(maxtext.V5P, "v5p (fitted)")
    held = table(maxtext.V5E, "v5e (held out)")
    gpu = table(maxtext.A3, "H100 (held out)")
    print(f"\nlargest error: v5p {fitted:.1%} (fitted), v5e {held:.1%} (held out), H100 "
          f"{gpu:.1%} (held out; the TPU-fitted constants do not carry over)")


if __name__ == "__main__":
    main()
