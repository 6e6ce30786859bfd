"""Planner: fleet names, the cost model against the CPU compiler, the search against brute force,
infeasible requests, the CLI, and training with mesh.auto."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import (ROOT, assert_one_line_error, compile_on_cpu, prediction_vs_cpu_compile,
                     small_test_config)
from paxlike.experiments import transformer
from paxlike import devices, loop
from paxlike.errors import UserError
from paxlike.mesh import build_mesh
from paxlike.planner import cost, fleets, hlo, search
from paxlike.trainer import Trainer

TOLERANCE = 0.10   # the bound for bytes and collective volume; never loosened


# ------------------------------------------------------------------------------------- fleets
@pytest.mark.parametrize("name,devices,granules,torus,aot", [
    ("v5p-128", 64, 1, (4, 4, 4), "v5p:4x4x4"),
    ("v5e-16", 16, 1, (4, 4), "v5e:4x4"),
    ("2xv5p-256", 256, 2, (4, 4, 8), "v5p:4x4x8"),
    ("v4-8", 4, 1, (2, 2, 1), "v4:2x2x1"),
    ("v6e-256", 256, 1, (16, 16), "v6e:16x16"),
    ("8xH100", 8, 1, (), None),
    ("4x8xH100", 32, 4, (), None),
    ("2x8xA100", 16, 2, (), None),
    ("cpu-8", 8, 1, (), None),
])
def test_fleet_names(name, devices, granules, torus, aot):
    fleet = fleets.parse_fleet(name)
    assert (fleet.num_devices, fleet.granules, fleet.torus, fleet.aot_topology) == (
        devices, granules, torus, aot)
    assert fleets.parse_fleet(fleets.fleet_name(fleet.device, fleet.granules,
                                                fleet.per_granule)).num_devices == devices


@pytest.mark.parametrize("name,message", [
    ("v5p-100", "power-of-two number of chips"),
    ("v5p-7", "multiple of 2"),
    ("v5e-512", "between 1 and 256"),
    ("h100", "unknown fleet name"),
    ("8xH100x", "unknown fleet name"),
    ("16xH100", "a node holds 1 to 8"),
    ("v7-8", "unknown fleet name"),
    ("0xv5p-8", "slices must be >= 1"),
    ("", "unknown fleet name"),
])
def test_malformed_fleet_names_are_clear_errors(name, message):
    with pytest.raises(UserError, match=message):
        fleets.parse_fleet(name)


def test_device_specs_are_the_mfu_table():
    assert devices.device_for_kind("TPU v5 lite").name == "v5e"
    assert devices.device_for_kind("NVIDIA H100 80GB HBM3").peak_flops == 989e12
    assert devices.device_for_kind("some new chip") is None
    assert fleets.parse_fleet("v5e-16").device is devices.DEVICES["v5e"]
    h100 = [_FakeDevice("NVIDIA H100 80GB HBM3", "gpu")] * 8
    assert devices.peak_flops(h100, None) == 8 * 989e12
    assert devices.peak_flops(h100, None, override_tflops_per_device=100) == 8 * 100e12


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    device_kind: str
    platform: str
    process_index: int = 0
    slice_index: int | None = None


@pytest.mark.parametrize("kind,platform,layout,granules,fleet", [
    ("TPU v5p", "tpu", [(0, 0)] * 4 + [(1, 1)] * 4, (2, False), "2xv5p-8"),   # 2 slices
    ("TPU v5p", "tpu", [(0, 0)] * 4 + [(1, 0)] * 4, (2, True), "v5p-16"),     # 1 slice, 2 hosts
    ("TPU v5 lite", "tpu", [(0, None)] * 4, (1, True), "v5e-4"),              # no slice_index
    ("NVIDIA H100 80GB HBM3", "gpu", [(0, None)] * 8 + [(1, None)] * 8, (2, True), "2x8xH100"),
])
def test_fleet_for_devices_finds_the_granules(kind, platform, layout, granules, fleet):
    """The slow-network granules are slices (slice_index), else processes (what the mesh's ICI /
    DCN split uses); a fleet counts one TPU slice's hosts as one granule (they share its ICI)."""
    devs = [_FakeDevice(kind, platform, p, s) for p, s in layout]
    assert devices.dcn_granules(devs) == granules
    assert fleets.fleet_for_devices(devs).name == fleet


# --------------------------------------------------------------- cost model vs the CPU compiler
_BASE = {"model.d_model": 128, "model.num_layers": 2, "model.mlp_dim": 512, "batch_size": 16,
         "seq_len": 128}
# name: (config overrides, mesh). The CPU working-set counts (models/transformer.py Profile) were
# read off the compiler's buffer assignment of the first eight; the "heldout" ones were never
# inspected: they were compiled once, after the counts were fixed (docs/planner.md has the
# ratios), and differ in width, heads, vocabulary, depth, sequence, batch, remat and mesh.
CPU_CASES = {
    "fsdp8": ({}, {"fsdp": 8}),
    "data2_fsdp2_tensor2": ({}, {"data": 2, "fsdp": 2, "tensor": 2}),
    "data8": ({"sharding": "data"}, {"data": 8}),
    "fsdp4_tensor2_2micro": ({"microbatches": 2}, {"fsdp": 4, "tensor": 2}),
    "fsdp8_remat_full": ({"model.remat": "full"}, {"fsdp": 8}),
    "fsdp8_save_dots": ({"model.remat": "save_dots"}, {"fsdp": 8}),
    "data2_fsdp4_dots_seq192": ({"model.remat": "save_dots", "seq_len": 192},
                                {"data": 2, "fsdp": 4}),
    "fsdp2_tensor4_heads8": ({"model.num_heads": 8, "model.num_kv_heads": 4, "batch_size": 8},
                             {"fsdp": 2, "tensor": 4}),
    "heldout_d192_full_data4_fsdp2": (
        {"model.d_model": 192, "model.num_heads": 6, "model.num_kv_heads": 3,
         "model.mlp_dim": 640, "model.remat": "full", "seq_len": 96, "batch_size": 32},
        {"data": 4, "fsdp": 2}),
    "heldout_vocab2048_tensor2_dots_2micro": (
        {"model.d_model": 256, "model.num_heads": 8, "model.num_kv_heads": 2,
         "model.mlp_dim": 768, "model.vocab_size": 2048, "model.remat": "save_dots",
         "seq_len": 64, "microbatches": 2},
        {"fsdp": 4, "tensor": 2}),
    # added 2026-12-07, the first tensor x full-remat case (compiled once, ratios only: 1.00
    # memory, 1.04 collectives, the all-reduces 1.07)
    "heldout_fsdp4_tensor2_full": ({"model.remat": "full"}, {"fsdp": 4, "tensor": 2}),
    "heldout_seq256_layers3_fsdp8": (
        {"model.d_model": 64, "model.num_heads": 2, "model.num_kv_heads": 1,
         "model.mlp_dim": 256, "model.num_layers": 3, "seq_len": 256, "batch_size": 8},
        {"fsdp": 8}),
}
_COMPILED = {}


def _case_config(overrides):
    return small_test_config(**{**_BASE, **overrides})


def _compiled_case(name):
    """(config, plan, compiled train step) of a case, compiled once per test session."""
    if name not in _COMPILED:
        overrides, mesh = CPU_CASES[name]
        cfg = _case_config(overrides)
        _COMPILED[name] = (cfg, *compile_on_cpu(cfg, mesh))
    return _COMPILED[name]


@pytest.mark.parametrize("name", sorted(CPU_CASES))
def test_memory_prediction_matches_cpu_compiler(name):
    r = prediction_vs_cpu_compile(*_compiled_case(name))
    assert abs(r["memory"] - 1) <= TOLERANCE, (r["predicted"].memory, r["bytes"])


@pytest.mark.parametrize("name", sorted(CPU_CASES))
def test_collective_prediction_matches_cpu_hlo(name):
    r = prediction_vs_cpu_compile(*_compiled_case(name))
    assert abs(r["collectives"] - 1) <= TOLERANCE, (r["predicted"].comm_by_kind, r["found"])
    # On CPU the op kinds are predictable too (gradient reductions are all-reduces here).
    for kind in ("all-gather", "all-reduce"):
        want, got = r["kinds"][kind]
        assert abs(want - got) <= TOLERANCE * r["volume"], (kind, want, got)


# Context parallelism (the length over `context`), full remat unless said. The per-layer counts
# (models/transformer.py Profile.context_collectives) and the separate gradient sum over
# `context` (cost.estimate) were read off the HLO of: ring and all_gather on context 4 x fsdp 2;
# all_gather with remat none; all_gather on context 8 with save_dots and on data 2 x context 4
# (those two were compiled as held-out checks, missed, were read, and are fitted now). These were
# compiled once, after: held out.
CONTEXT_CASES = {
    "heldout_ring_context4_tensor2": (
        {"model.context_parallel": "ring", "batch_size": 8}, {"context": 4, "tensor": 2}),
    "heldout_all_gather_context2_fsdp2_tensor2_d192_seq256": (
        {"model.d_model": 192, "model.mlp_dim": 384, "seq_len": 256, "batch_size": 8},
        {"context": 2, "fsdp": 2, "tensor": 2}),
    "heldout_ring_data2_context2_fsdp2_save_dots_seq256": (
        {"model.context_parallel": "ring", "model.remat": "save_dots", "seq_len": 256,
         "batch_size": 8, "model.mlp_dim": 320}, {"data": 2, "context": 2, "fsdp": 2}),
    # memory not asserted: without remat the residuals are traced on one device, where ring
    # attention is plain attention saving its [t, t] probabilities (predicted 1.26x; docs)
    "heldout_ring_context2_fsdp4_none_seq256_heads8": (
        {"model.context_parallel": "ring", "model.remat": "none", "seq_len": 256,
         "batch_size": 8, "model.num_heads": 8, "model.num_kv_heads": 4},
        {"context": 2, "fsdp": 4}),
}


# Long sequences, where the attention's backward pass is the peak (its array counts,
# models/transformer.py Profile.working_set, were read at T = 512-2048 on d 64 models; these
# were compiled once, after). Also held out, not in the suite: XLA attention on data 2 x fsdp 4,
# no remat, 2 / 1 heads, T = 768 (memory 1.039, collectives 1.076) and all_gather on context 2 x
# fsdp 4, T = 1024 (0.988, 1.028).
CONTEXT_CASES.update({
    "heldout_long_xla_fsdp4_tensor2_seq1024_heads8_save_dots": (
        {"seq_len": 1024, "batch_size": 8, "model.num_heads": 8, "model.num_kv_heads": 4,
         "model.mlp_dim": 256, "model.remat": "save_dots"}, {"fsdp": 4, "tensor": 2}),
    "heldout_long_ring_context4_fsdp2_seq1536_heads8": (
        {"model.context_parallel": "ring", "seq_len": 1536, "batch_size": 8,
         "model.num_heads": 8, "model.num_kv_heads": 2, "model.mlp_dim": 256},
        {"context": 4, "fsdp": 2}),
})


@pytest.mark.parametrize("name", sorted(CONTEXT_CASES))
def test_context_parallel_prediction_matches_cpu_compiler(name):
    overrides, mesh = CONTEXT_CASES[name]
    cfg = _case_config({"model.remat": "full", **overrides})
    r = prediction_vs_cpu_compile(cfg, *compile_on_cpu(cfg, mesh))
    assert abs(r["collectives"] - 1) <= TOLERANCE, (r["predicted"].comm_by_kind, r["found"])
    if cfg.model.remat != "none" or cfg.model.context_parallel != "ring":
        assert abs(r["memory"] - 1) <= TOLERANCE, (r["predicted"].memory, r["bytes"])


def test_hlo_reader_counts_loop_trips():
    # Gathers inside the layer scan run once per layer: one more layer adds one layer's gathers.
    volumes, predicted = [], []
    for layers in (2, 3):
        cfg = _case_config({"model.num_layers": layers})
        plan = cost.Plan.make({"fsdp": 8}, {}, "fsdp_tp", 1, "none")
        predicted.append(cost.estimate(cfg, plan, fleets.parse_fleet("cpu-8"),
                                       "cpu").comm_by_kind["all-gather"])
        compiled = Trainer(cfg, build_mesh({"fsdp": 8})).compile()
        volumes.append(hlo.collectives(compiled.as_text(), 8)["all-gather"]["volume"])
    per_layer = predicted[1] - predicted[0]
    assert per_layer > 0
    assert abs((volumes[1] - volumes[0]) - per_layer) <= TOLERANCE * per_layer


# ------------------------------------------------------------------- the search vs brute force
def _small_fleet(hbm_bytes, granules=1, per_granule=8):
    device = dataclasses.replace(devices.DEVICES["v5e"], hbm_bytes=hbm_bytes)
    return fleets.Fleet(f"test-{granules}x{per_granule}", device, granules, per_granule)


@pytest.mark.parametrize("granules,per_granule,batch", [(1, 8, 32), (2, 4, 32), (1, 8, 2)],
                         ids=["1x8", "2x4", "1x8_batch2_context"])
def test_planner_finds_a_feasible_plan_whenever_one_exists(granules, per_granule, batch):
    cfg = _case_config({"batch_size": batch})
    everything = list(search.enumerate_all(cfg, _small_fleet(1.0, granules, per_granule), "tpu"))
    footprints = sorted({c.bytes_per_device for c in everything})
    # Memory limits around every distinct footprint: just below, just above, and far above.
    limits = {f / search.HEADROOM * k for f in footprints[:: max(len(footprints) // 6, 1)]
              for k in (0.999, 1.001)} | {footprints[0] * 0.5, footprints[-1] * 2}
    for hbm in sorted(limits):
        fleet = _small_fleet(hbm, granules, per_granule)
        brute = [c for c in search.enumerate_all(cfg, fleet, "tpu") if search.fits(c)]
        result = search.search(cfg, fleet, "tpu")
        assert bool(result.plans) == bool(brute), hbm
        assert all(search.fits(c) for c in result.plans)
        if brute:
            assert result.plans[0].step_time_s <= min(c.step_time_s for c in brute) * (1 + 1e-9)
        for c in result.plans:   # only data-like axes cross DCN, tensor stays inside a slice
            dcn = c.plan.dcn_sizes
            assert dcn["tensor"] == 1 and dcn["fsdp"] == 1
            # the slices split the data, or they are the pipeline's stages (`pipeline.options`)
            assert (dcn["data"], dcn["pipeline"]) in ((granules, 1), (1, granules)), dcn
        if granules > 1:   # both kinds of plan are searched
            assert {c.plan.dcn_sizes["pipeline"] for c in everything} == {1, granules}
    # the sequence is split over context only where the batch cannot fill the devices; with 2
    # rows on 8 devices every valid plan splits it (tensor 4 would leave data x fsdp = 2, but
    # the 2 KV heads do not divide 4 ways)
    contexts = {c.plan.sizes["context"] for c in everything}
    assert contexts == ({1} if batch >= granules * per_granule else {2, 4}), contexts


def test_small_batches_of_long_sequences_are_planned_with_context():
    """4 sequences of 32768 tokens on 64 chips: the batch fills at most 4 of them, so every plan
    splits the sequence (context 2-16 with tensor and fsdp); with 64 sequences none does."""
    cfg = transformer.get_config("1b")
    cfg.batch_size, cfg.seq_len = 4, 32768
    result = search.search(cfg, fleets.parse_fleet("v5p-128"))
    assert result.plans
    for c in result.plans:
        sizes = c.plan.sizes
        assert sizes["context"] > 1 and 4 % (sizes["data"] * sizes["fsdp"]) == 0, sizes
    assert "context=" in result.plans[0].plan.describe()
    cfg.batch_size = 64
    assert all(c.plan.sizes["context"] == 1 for c in search.search(
        cfg, fleets.parse_fleet("v5p-128")).plans)


def test_plans_are_ranked_and_name_their_binding_constraint():
    cfg = transformer.get_config("1b")
    result = search.search(cfg, fleets.parse_fleet("v5p-128"))
    times = [c.step_time_s for c in result.plans]
    assert times == sorted(times) and len(times) >= 5
    for c in result.plans[:5]:
        assert c.binding == "compute" or c.binding.startswith(("ICI", "DCN"))
        assert 0 < c.mfu <= 1 and c.bytes_per_device <= search.HEADROOM * c.hbm_bytes
        assert "of HBM" in result.why(c)


def test_infeasible_request_names_the_smallest_fleet_that_fits():
    cfg = transformer.get_config("7b")
    result = search.search(cfg, fleets.parse_fleet("v5e-4"))
    assert not result.plans
    message = search.infeasible_message(cfg, result)
    assert message.startswith("no plan fits on v5e-4")
    name = re.search(r"the smallest v5e fleet that fits is (\S+)$", message).group(1)
    assert search.search(cfg, fleets.parse_fleet(name)).plans
    smaller = [f for f in fleets.larger_fleets(fleets.parse_fleet("v5e-4"))
               if f.num_devices < fleets.parse_fleet(name).num_devices]
    assert all(not search.search(cfg, f).plans for f in smaller)


# ----------------------------------------------------------------------------------- the CLI
def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "paxlike.plan", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_plan_cli_json_format():
    out = _cli("--config=experiments/transformer.py:7b", "--fleet=v5p-128", "--top=3", "--json")
    assert out.returncode == 0, out.stderr
    plans = json.loads(out.stdout)["plans"]
    assert len(plans) == 3
    for p in plans:
        assert list(p) == ["mesh", "dcn", "preset", "microbatches", "remat", "pipeline_repeats",
                           "pipeline_fsdp_gather", "bytes_per_device", "comm_bytes",
                           "step_time_s", "mfu", "binding", "time_parts_s", "why"]
        assert p["pipeline_repeats"] >= 1 and p["pipeline_fsdp_gather"] == "per_iteration"
        assert set(p["time_parts_s"]) == {"compute", "hidden_ici", "exposed_ici", "dcn"}
        assert p["why"].startswith("compute ") and 0 < p["mfu"] < 1
        assert all(k.endswith(("/ici", "/dcn")) for k in p["comm_bytes"])


def test_plan_cli_errors():
    bad = _cli("--fleet=v5p-100")
    assert_one_line_error(bad, "^paxlike: error: fleet 'v5p-100'")
    infeasible = _cli("--config=experiments/transformer.py:7b", "--fleet=v5e-4")
    assert infeasible.returncode == 1
    assert "no plan fits on v5e-4" in infeasible.stderr and "that fits is v5e-" in infeasible.stderr


# ------------------------------------------------------------------------- training, mesh.auto
def test_mesh_auto_trains_with_the_top_plan(tmp_path):
    cfg = small_test_config(**{"mesh.auto": True, "mesh.fsdp": 1, "steps": 2})
    losses = loop.run(cfg, str(tmp_path / "auto"))
    assert len(losses) == 2 and all(l == l for l in losses)
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    expected = search.search(small_test_config(), fleets.fleet_for_devices(jax.devices())).plans[0]
    assert {a: saved["mesh"][a] for a, _ in expected.plan.mesh} == dict(expected.plan.mesh)
    assert saved["sharding"] == expected.plan.preset
