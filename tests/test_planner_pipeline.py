"""The planner on pipeline plans (paxlike/pipeline.py, paxlike/planner/pipeline.py): predicted
collective volume and per-device memory against the pipelined train step compiled for 8 CPU
devices, and the search choosing a pipeline across slices when DCN is what binds.

Which cases set the model (docs/planner.md, "Pipeline parallelism"): its collective terms were
read off the XLA:CPU HLO of `fit_*` cases (per-iteration FSDP gathers and reductions, the stage
hand-off, the buffer's gather over `pipeline` and its all-to-all back to the head's rows, the
R > 1 relayout all-to-all) and of the v5p AOT case of tests/test_aot.py; its memory terms are
counts of arrays (GPipe residuals, buffers), with the v5p-only terms read off that AOT case's
buffer assignment. Nothing is a fitted multiple. The `heldout_` case (tensor parallelism,
save_dots, 8 heads, sequence 64, R = 2) was compiled once after the first terms were fixed;
since the batch moved over `pipeline` outside the stages, its HLO was printed beside the fitted
cases' while the new buffer and return terms were read, and its buffer assignment was read
with the fitted cases' when the stages began taking their layers' weights inside the remat body
(save_dots saving as full under a pipeline): it is no longer held out.

Tolerances: the project's 10%, collective volume and memory. The memory model misses one of
the three cases (KNOWN_MEMORY_GAPS), marked as an expected failure.
"""

import dataclasses

import pytest

from configs import small_test_config
from paxlike import devices
from paxlike.compiled import compile_plan
from paxlike.errors import UserError
from paxlike.planner import cost, fleets, search

TOLERANCE = 0.10

_BASE = {"model.d_model": 128, "model.num_layers": 4, "model.mlp_dim": 512, "batch_size": 16,
         "seq_len": 128}
# name: (config overrides, mesh)
CASES = {
    "fit_pipeline2_fsdp4_m2": ({"microbatches": 2}, {"pipeline": 2, "fsdp": 4}),
    "fit_pipeline2_data2_fsdp2_m4_r2_full": (
        {"microbatches": 4, "pipeline_repeats": 2, "model.remat": "full"},
        {"pipeline": 2, "data": 2, "fsdp": 2}),
    "heldout_pipeline2_fsdp2_tensor2_r2_dots": (
        {"microbatches": 2, "pipeline_repeats": 2, "model.remat": "save_dots",
         "model.num_heads": 8, "model.num_kv_heads": 4, "seq_len": 64},
        {"pipeline": 2, "fsdp": 2, "tensor": 2}),
}
# Memory gaps (predicted / compiled): the test asserts the project's 10% and expects these to
# fail it (strict: a fix makes them pass, and the marks must go). Since the pipeline's output is
# constrained back to the rows split over `pipeline` and `split_rows` keeps each device's rows
# (paxlike/pipeline.py `run`), the head no longer gathers the global batch and the data 2 case
# (B/M = 4 rows < 8 batch shards) no longer rematerializes the embedded batch whole: it passes
# again (0.96; 0.87 before, 1.03 before the batch moved over `pipeline`).
KNOWN_MEMORY_GAPS = {
    "fit_pipeline2_fsdp4_m2": "0.72 (40.0 vs 55.4 MB): under remat none XLA:CPU's heap packs "
                              "the GPipe residual stacks loosely (live at the peak 36.8 MB of "
                              "temporaries, allocated 53.5 MB), not modelled",
}


def _config(overrides):
    return small_test_config(**{**_BASE, **overrides})


@pytest.fixture(scope="module")
def reports():
    return compile_cases()


def compile_cases():
    """{case: `compile_plan` report} on this process's (8 CPU) devices."""
    import jax
    out = {}
    for name, (overrides, mesh) in CASES.items():
        cfg = _config(overrides)
        plan = cost.Plan.make(mesh, {}, cfg.sharding, cfg.microbatches, cfg.model.remat,
                              cfg.pipeline_repeats)
        out[name] = compile_plan(cfg, jax.devices(), plan)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_collectives_match_cpu_compiler(reports, name):
    report = reports[name]
    predicted = report["predicted"]["collective_volume"]
    found = report["collectives"]
    total = sum(v["volume"] for v in found.values())
    assert abs(sum(predicted.values()) / total - 1) <= TOLERANCE, (predicted, found)
    # The stage hand-off is there, priced per iteration, forward and backward.
    assert found["collective-permute"]["count"] >= 2 * (
        report["plan"]["microbatches"] * report["plan"]["pipeline_repeats"] + 1)
    for kind in ("all-gather", "all-reduce", "collective-permute", "all-to-all"):
        want, got = predicted.get(kind, 0.0), found.get(kind, {"volume": 0})["volume"]
        assert abs(want - got) <= TOLERANCE * total, (kind, want, got)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MEMORY_GAPS[n]))
    if n in KNOWN_MEMORY_GAPS else n for n in sorted(CASES)])
def test_pipeline_memory_matches_cpu_compiler(reports, name):
    report = reports[name]
    ratio = report["predicted"]["bytes_per_device"] / report["bytes_per_device"]
    assert abs(ratio - 1) <= TOLERANCE, (ratio, report["predicted"]["memory"],
                                         report["memory_analysis"])


def test_pipeline_terms():
    """Bubble, relayout and hand-off terms respond as the schedule says."""
    cfg = _config({"microbatches": 4})
    fleet = fleets.parse_fleet("cpu-8")
    one = cost.estimate(cfg, cost.Plan.make({"pipeline": 2, "fsdp": 4}, {}, "fsdp_tp", 4), fleet)
    two = cost.estimate(cfg, cost.Plan.make({"pipeline": 2, "fsdp": 4}, {}, "fsdp_tp", 4,
                                            pipeline_repeats=2), fleet)
    assert one.comm_by_kind["collective-permute"] > 0 and "all-to-all" in two.comm_by_kind
    assert two.comm_by_kind["all-to-all"] > one.comm_by_kind.get("all-to-all", 0)   # relayout
    assert two.compute_s < one.compute_s   # bubble 1/9 instead of 1/5
    with pytest.raises(UserError, match="multiple of mesh.pipeline"):
        cost.estimate(_config({"batch_size": 48}),
                      cost.Plan.make({"pipeline": 2, "fsdp": 4}, {}, "fsdp_tp", 3), fleet)
    applied = _config({})
    cost.Plan.make({"pipeline": 2, "fsdp": 4}, {}, "fsdp_tp", 4, "none", 2).apply(applied)
    assert (applied.mesh.pipeline, applied.microbatches, applied.pipeline_repeats) == (2, 4, 2)


def test_search_pipelines_across_slices_when_dcn_binds():
    """With a slow network between slices, the data-parallel gradient all-reduce over DCN binds;
    a pipeline across the slices sends microbatch activations instead (wide layers, few tokens:
    weights outweigh activations)."""
    cfg = _config({"model.d_model": 512, "model.mlp_dim": 2048, "seq_len": 32})
    slow = dataclasses.replace(devices.DEVICES["v5p"], dcn_bytes_per_s=1e8)
    result = search.search(cfg, fleets.Fleet("slow-2x4", slow, 2, 4), "tpu")
    top = result.plans[0]
    assert top.plan.sizes["pipeline"] == 2 and top.plan.dcn_sizes["pipeline"] == 2, (
        top.plan.describe())
    assert top.plan.dcn_sizes["data"] == 1 and top.comm["pipeline/dcn"] > 0
    data = next(c for c in result.plans if c.plan.sizes["pipeline"] == 1)
    assert data.plan.dcn_sizes["data"] == 2 and data.step_time_s > 2 * top.step_time_s
    # A compute-bound full-size job keeps its bubble-free plan.
    from paxlike.experiments import transformer
    big = search.search(transformer.get_config("7b"), fleets.parse_fleet("2xv5p-256"))
    assert big.plans[0].plan.sizes["pipeline"] == 1 and big.plans[0].binding == "compute"


if __name__ == "__main__":   # the docs' table: python tests/test_planner_pipeline.py
    import os
    import sys

    import jax
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    jax.config.update("jax_num_cpu_devices", 8)
    for case, report in sorted(compile_cases().items()):
        p = report["predicted"]
        volume = sum(v["volume"] for v in report["collectives"].values())
        print(f"| {case} | {p['bytes_per_device'] / report['bytes_per_device']:.2f} "
              f"({p['bytes_per_device'] / 1e6:.1f} vs {report['bytes_per_device'] / 1e6:.1f} MB) | "
              f"{sum(p['collective_volume'].values()) / volume:.2f} |", file=sys.stdout)
