"""The planner: every valid plan for a config on a fleet, ranked by predicted step time.

Valid means: the mesh uses every device; tensor parallelism stays inside one slice / node (its
per-layer all-reduces would crawl over DCN); only data-like axes cross DCN (data, and fsdp when
`allow_dcn_fsdp`); the batch, the sequence and every sharded parameter dimension divide; and the
predicted per-device bytes fit the device's memory with `HEADROOM` to spare (the cost model's
tolerance against the compiler is ±10%).

Within one (mesh, preset, remat) more microbatches only add FSDP traffic and never speed a step
up, so the planner keeps the fewest microbatches that fit; `enumerate_all` lists every
combination (the brute force the tests compare against).

For mixture-of-experts configs (`model.num_experts` > 0) the `expert` axis is split too, inside
one slice / node, by the divisors of the expert count, with the presets that shard experts over
it (`fsdp_tp`; `fold_tensor` when `tensor` > 1 as well: experts over expert x tensor); dense
configs plan exactly as before.

Dense configs are also planned with a pipeline (`paxlike.planner.pipeline.options`): S stages
dividing the stacked layer blocks, either across all slices (the
pipeline alone crosses DCN, instead of data) or 2 / 4 stages inside a slice; microbatches a
multiple of S, circular repeats R in {1, 2} where they divide, FSDP weights gathered per
iteration. More microbatches shrink a pipeline's bubble, so pipeline plans try every count that
fits, not only the fewest.

The `context` axis (the sequence split over devices, inside a slice / node) is tried where the
batch cannot occupy the devices left after tensor and expert: long-sequence training with a few
sequences per step. Context sizes go up to the factor that lets data x fsdp divide the batch
(`context_options`); where the batch is large enough, splitting it is never worse than splitting
the sequence (no key / value traffic), so context stays at 1 and such configs plan as before.
"""

from __future__ import annotations

import dataclasses
import math

from paxlike import sharding
from paxlike.errors import UserError
from paxlike.planner import cost
from paxlike.planner import pipeline as pipeline_model
from paxlike.planner.fleets import Fleet, larger_fleets

HEADROOM = 0.9   # plans must fit in this fraction of device memory


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def num_experts(cfg) -> int:
    """Routed experts of a mixture-of-experts config (0: a dense model)."""
    return int(cfg.model.get("num_experts", 0) or 0)


def context_options(per: int, granules: int, batch_size: int, seq_len: int) -> list[int]:
    """Context sizes for `per` devices per slice / node left after tensor and expert: 1, and
    where the batch cannot fill the `per x granules` data-like devices, each c dividing `per`
    and the sequence with batch x c at most the devices (beyond that the batch is split
    below the devices it could fill)."""
    if not batch_size or batch_size >= per * granules:
        return [1]
    return [c for c in _divisors(per)
            if seq_len % c == 0 and (c == 1 or batch_size * c <= per * granules)]


def meshes(fleet: Fleet, allow_dcn_fsdp: bool = False, experts: int = 0, layers: int = 0,
           batch_size: int = 0, seq_len: int = 0):
    """(sizes, dcn) for every split of the fleet over data, fsdp and tensor, over expert
    (dividing `experts`, inside a slice / node) when `experts` > 0, over pipeline (dense
    models with `layers` stacked layer blocks: `pipeline.options`), and over context where a
    batch of `batch_size` sequences of `seq_len` tokens cannot fill the devices
    (`context_options`; `batch_size` 0: never)."""
    stage_options = (pipeline_model.options(layers, fleet.per_granule, fleet.granules)
                     if layers and not experts else [(1, 1)])
    for stages, dcn_pipe in stage_options:
        per = fleet.per_granule // (stages // dcn_pipe)
        granules = fleet.granules // dcn_pipe
        for tensor in _divisors(per):
            for expert in ([e for e in _divisors(per // tensor) if experts % e == 0]
                           if experts else [1]):
                rest = per // (tensor * expert)
                # (a pipeline splits the batch into microbatches instead: context stays 1)
                for context in (context_options(rest, granules, batch_size, seq_len)
                                if stages == 1 else [1]):
                    yield from _data_splits(rest // context, granules, allow_dcn_fsdp, {
                        "tensor": tensor, "pipeline": stages, "context": context,
                        **({"expert": expert} if experts else {})}, dcn_pipe)


def _data_splits(per: int, granules: int, allow_dcn_fsdp: bool, others: dict, dcn_pipe: int):
    """The splits of `per` devices per slice x `granules` over data and fsdp, beside `others`."""
    for fsdp_ici in _divisors(per):
        data_ici = per // fsdp_ici
        for dcn_fsdp in (_divisors(granules) if allow_dcn_fsdp else [1]):
            dcn_data = granules // dcn_fsdp
            sizes = {"data": data_ici * dcn_data, "fsdp": fsdp_ici * dcn_fsdp, **others}
            if sizes["context"] == 1:
                del sizes["context"]
            yield sizes, {"data": dcn_data, "fsdp": dcn_fsdp, "pipeline": dcn_pipe}


def _meshes(cfg, fleet: Fleet, allow_dcn_fsdp: bool):
    return meshes(fleet, allow_dcn_fsdp, num_experts(cfg), _layers(cfg), cfg.batch_size,
                  cfg.seq_len)


def _layers(cfg) -> int:
    return pipeline_model.num_layer_blocks(cost.param_infos(cfg))


def _schedules(cfg, sizes, preset):
    """(microbatches, repeats) of a mesh: the microbatch options, and for a pipeline only
    multiples of its stages, with each circular repeat count."""
    stages = sizes.get("pipeline", 1)
    counts = pipeline_model.microbatch_options(stages, _microbatch_options(cfg, sizes, preset))
    for r in pipeline_model.repeats(_layers(cfg), stages):
        yield r, counts


def _presets(sizes) -> list[str]:
    # Equivalent rule tables are listed once: with tensor=1 'fsdp_tp' is 'fsdp', and with
    # fsdp=1 as well it is plain 'data'. With expert > 1 only the presets that shard experts
    # over it: 'fsdp_tp', and 'fold_tensor' (experts over expert x tensor) when tensor > 1.
    # 'data' does not split the length, so a context split takes 'fsdp' even at fsdp=1.
    if sizes.get("expert", 1) > 1:
        return ["fsdp_tp", "fold_tensor"] if sizes["tensor"] > 1 else ["fsdp_tp"]
    if sizes["tensor"] > 1:
        return ["fsdp_tp"]
    return ["data"] if sizes["fsdp"] == 1 and sizes.get("context", 1) == 1 else ["fsdp"]


def _microbatch_options(cfg, sizes, preset) -> list[int]:
    rules = sharding.get_rules(preset)
    ways = math.prod(sizes.get(a, 1) for a in rules["batch"])
    if cfg.batch_size % ways:
        return []
    # A pipeline's microbatch is split over the batch axes inside a stage only (`pipeline` not
    # among them), so it may hold fewer rows than there are batch shards outside.
    stages = sizes.get(pipeline_model.AXIS, 1) if pipeline_model.AXIS in rules["batch"] else 1
    return _divisors(cfg.batch_size * stages // ways)


def fits(c: cost.Cost) -> bool:
    return c.bytes_per_device <= HEADROOM * c.hbm_bytes


def _try(cfg, plan, fleet, backend):
    try:
        return cost.estimate(cfg, plan, fleet, backend)
    except UserError:  # a dimension that this mesh does not divide: not a valid plan
        return None


def enumerate_all(cfg, fleet: Fleet, backend: str | None = None, allow_dcn_fsdp: bool = False,
                  remats=cost.REMATS):
    """Every valid plan with every microbatch count (brute force; for tests and --all)."""
    cost.profile(cfg)
    for sizes, dcn in _meshes(cfg, fleet, allow_dcn_fsdp):
        for preset in _presets(sizes):
            for repeats, counts in _schedules(cfg, sizes, preset):
                for mb in counts:
                    for remat in remats:
                        c = _try(cfg, cost.Plan.make(sizes, dcn, preset, mb, remat, repeats),
                                 fleet, backend)
                        if c is not None:
                            yield c


@dataclasses.dataclass
class Result:
    fleet: Fleet
    plans: list[cost.Cost]           # feasible, best first
    closest: cost.Cost | None        # least memory of all valid plans (for the infeasible message)
    considered: int

    def why(self, c: cost.Cost) -> str:
        """One line: where the plan's step time goes, and what memory forced."""
        use = c.bytes_per_device / c.hbm_bytes
        forced = []
        if c.plan.microbatches > 1:
            forced.append(f"{c.plan.microbatches} microbatches")
        if c.plan.remat != "none":
            forced.append(f"remat={c.plan.remat}")
        memory = f"{use:.0%} of HBM" + (f" with {', '.join(forced)}" if forced else "")
        return f"{c.binding}-bound: {c.reason}; {memory}"


def search(cfg, fleet: Fleet, backend: str | None = None, allow_dcn_fsdp: bool = False) -> Result:
    """All feasible plans, fastest first (ties: less communication time, less remat, fewer
    microbatches, less memory)."""
    cost.profile(cfg)   # a family the planner cannot model is said as such, up front
    plans, closest, considered = [], None, 0
    for sizes, dcn in _meshes(cfg, fleet, allow_dcn_fsdp):
        pipelined = sizes.get("pipeline", 1) > 1
        for preset in _presets(sizes):
            for remat in cost.REMATS:
                for repeats, counts in _schedules(cfg, sizes, preset):
                    for mb in counts:
                        c = _try(cfg, cost.Plan.make(sizes, dcn, preset, mb, remat, repeats),
                                 fleet, backend)
                        if c is None:
                            continue
                        considered += 1
                        if closest is None or c.bytes_per_device < closest.bytes_per_device:
                            closest = c
                        if fits(c):
                            plans.append(c)
                            if not pipelined:
                                break    # more microbatches would only be slower
                            # (a pipeline's bubble shrinks with more microbatches: try them all)
    # Plans are ranked by predicted step time (paxlike/planner/steptime.py); exact ties go to
    # the one with the most communication slack, then to less recomputation and fewer
    # microbatches, then to less memory.
    plans.sort(key=lambda c: (round(c.step_time_s, 12), round(sum(c.comm_s.values()), 9),
                              cost.REMATS.index(c.plan.remat), c.plan.microbatches,
                              c.bytes_per_device))
    return Result(fleet, plans, closest, considered)


def smallest_fitting_fleet(cfg, fleet: Fleet, backend: str | None = None) -> Fleet | None:
    """The smallest larger fleet of the same device kind with a feasible plan (None: none)."""
    for bigger in larger_fleets(fleet):
        if search(cfg, bigger, backend).plans:
            return bigger
    return None


def infeasible_message(cfg, result: Result, backend: str | None = None) -> str:
    fleet = result.fleet
    gib = 1024 ** 3
    text = f"no plan fits on {fleet.name} ({fleet.num_devices} x {fleet.device.name}, " \
           f"{fleet.device.hbm_bytes / gib:.0f} GiB each)"
    if result.closest is not None:
        c = result.closest
        text += (f": the smallest footprint is {c.bytes_per_device / gib:.1f} GiB per device "
                 f"({c.plan.describe()}, {c.plan.preset}, {c.plan.microbatches} microbatches, "
                 f"remat={c.plan.remat}) against {HEADROOM:.0%} of "
                 f"{c.hbm_bytes / gib:.0f} GiB")
    else:
        text += ": no mesh divides the model and batch"
    bigger = smallest_fitting_fleet(cfg, fleet, backend)
    text += (f"; the smallest {fleet.device.name} fleet that fits is {bigger.name}" if bigger
             else f"; no {fleet.device.name} fleet up to the largest considered fits")
    return text
