"""Cost model: per-device memory, communication per link, step time and MFU of one plan.

A *plan* is what the trainer needs to run a config on a fleet: mesh sizes per axis (with the part
of each axis that crosses DCN), a sharding preset, microbatches and a remat policy. The model is
analytic and fast once the model's shapes are known, and it is checked against the compiler:
tests/test_planner.py and tests/test_aot.py compare its bytes with XLA's memory analysis and its
collective volume with the optimized HLO (`paxlike.planner.hlo`). docs/planner.md has the figures.

Parameters, gradients and optimizer state are exact: they come from the model's own parameter
shapes and logical axis names, sharded by the same rules code the trainer uses
(`paxlike.sharding.logical_to_spec`). Saved activations are traced (`saved_residuals` under the
config's remat policy, `paxlike.planner.residuals`). The working set XLA keeps beyond them,
remat's extra FLOPs and the tensor-parallel sums per layer are declared by the model family beside its definition
(`planner_profile(model_cfg)` in the module `model.module` names, paxlike/family.py; the shared
part is `paxlike.planner.workingset.Profile`; the planner imports no model): on CPU counted in
arrays of the model's own sizes, read from the compiler's buffer assignment at the peak; on TPU a
fitted multiple of the same units (`CALIBRATION`).

Communication is counted per step, per mesh axis and link (ICI / DCN), as the full buffer each
collective gathers / reduces / permutes (the figure `paxlike.planner.hlo` reads from compiled
programs, comparable across backends), and converted to bytes on the wire for timing
(`paxlike.planner.steptime`: compute, weight traffic hidden behind it, activation and DCN
traffic on the critical path). The
mixture-of-experts family adds its expert-parallel exchanges, routed buffers and FLOPs
(`paxlike.planner.moe`); the pipeline axis its bubble, microbatches in flight, stage hand-offs
and weight relayout (`paxlike.planner.pipeline`); the context axis what the family's sequence
blocks exchange (`Profile.context_collectives`: the Transformer's all-gathered or ring-passed keys
and values) and the gradient sums over it; the search tries it where the batch cannot fill the
devices (`search.context_options`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

from paxlike import sharding
from paxlike.errors import UserError
from paxlike.mesh import MESH_AXES
from paxlike.planner.fleets import Fleet
from paxlike.planner import pipeline as pipeline_model
from paxlike.planner.residuals import saved_bytes
from paxlike.planner import steptime
from paxlike.planner.moe import MoEActivations

REMATS = ("none", "save_dots", "full")
# Fixed cost of one collective (launch and synchronisation), order of magnitude for TPU ICI and
# data-centre networks: it is what makes 64 microbatches or per-layer tensor all-reduces slower
# than their bytes alone suggest.
LATENCY_S = {"ici": 20e-6, "dcn": 200e-6}

# TPU (and, unverified, GPU) memory beyond parameters, optimizer state and gradients: multiples
# of the saved activations and of the working-set units (the family profile's `units` plus
# "gathered": one layer's and the output head's weights gathered whole), fitted per TPU
# generation to compiled memory analyses (docs/planner.md lists the configurations and
# residuals). The TPU compiler makes memory-dependent choices (v5e runs FSDP gathers as
# windowed-einsum permute rings, v5p as whole-buffer all-reduces), hence per generation; and its
# memory analysis counts more temporary memory than its dumped buffer assignment shows (310 vs
# 282 MB on the v5e CI case, 12.9 vs 9.0 GB on 7b / v5e-16), so the CPU backend's derivation from
# the buffer assignment (workingset.py) cannot be repeated for TPU from a dump. Generations and
# GPUs without a fit of their own use the v5p figures. The CPU backend needs no fit.
CALIBRATION = {
    "v5e": {"saved": 1.647, "scores": 0.985, "logits": 0.0, "stream": 0.0, "gathered": 0.0},
    "v5p": {"saved": 1.0, "scores": 0.0, "logits": 3.46, "stream": 0.0, "gathered": 0.157},
}


def calibration(device_name: str) -> dict[str, float]:
    return CALIBRATION.get(device_name, CALIBRATION["v5p"])


# The TPU compiler all-gathers the f32 cotangent of a microbatch's embeddings whole (to scatter
# the vocabulary-sharded table's gradient) when that buffer is small: it did at 268 MB (1b-class
# fsdp 16 x tensor 4 and fsdp 32 x tensor 2, 7b fsdp 4 x tensor 4), and did not at 2.1 and
# 4.3 GB (7b fsdp 32 x tensor 2, fsdp 64 x tensor 2: table-sized or all-to-all traffic instead).
# The limit lies somewhere between; 1 GiB is a guess inside that interval.
EMBED_GATHER_LIMIT = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[tuple[str, int], ...]     # all six axes, total sizes
    dcn: tuple[tuple[str, int], ...]      # the DCN part of each axis
    preset: str
    microbatches: int
    remat: str
    pipeline_repeats: int = 1               # R (with mesh.pipeline > 1)
    pipeline_fsdp_gather: str = "per_iteration"

    @staticmethod
    def make(mesh: dict, dcn: dict | None = None, preset: str = "fsdp_tp", microbatches: int = 1,
             remat: str = "none", pipeline_repeats: int = 1,
             pipeline_fsdp_gather: str = "per_iteration") -> "Plan":
        return Plan(tuple((a, int(mesh.get(a, 1))) for a in MESH_AXES),
                    tuple((a, int((dcn or {}).get(a, 1))) for a in MESH_AXES),
                    preset, microbatches, remat, int(pipeline_repeats), pipeline_fsdp_gather)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def dcn_sizes(self) -> dict[str, int]:
        return dict(self.dcn)

    def apply(self, cfg) -> None:
        """Writes this plan into a trainer config (mesh, dcn, sharding, microbatches, remat,
        pipeline repeats and FSDP gather)."""
        for axis, size in self.mesh:
            cfg.mesh[axis] = size
        for axis, size in self.dcn:
            cfg.mesh.dcn[axis] = size
        cfg.sharding, cfg.microbatches, cfg.model.remat = self.preset, self.microbatches, self.remat
        cfg.pipeline_repeats = self.pipeline_repeats
        cfg.pipeline_fsdp_gather = self.pipeline_fsdp_gather

    def describe(self) -> str:
        parts = []
        for axis, size in self.mesh:
            if size > 1:
                d = self.dcn_sizes[axis]
                parts.append(f"{axis}={size}" + (f"(dcn {d})" if d > 1 else ""))
        return (" ".join(parts) or "1 device") + pipeline_model.describe(self)


class _MeshShape:
    """Stands in for a jax Mesh where only axis sizes matter (sharding.logical_to_spec)."""

    def __init__(self, sizes: dict[str, int]):
        self.shape = dict(sizes)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    path: str
    shape: tuple[int, ...]
    names: tuple[str | None, ...]


@functools.lru_cache(maxsize=32)
def _param_infos(model_key: str) -> tuple[ParamInfo, ...]:
    import json

    import ml_collections
    from flax import nnx

    from paxlike import family
    model_cfg = ml_collections.ConfigDict(json.loads(model_key))
    abstract = nnx.eval_shape(lambda: family.load(model_cfg).build(model_cfg, nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    infos = []
    for path, var in jax_leaves_with_path(state):
        infos.append(ParamInfo("/".join(str(getattr(p, "key", p)) for p in path), tuple(var.shape),
                               sharding.variable_names(var)))
    return tuple(infos)


def jax_leaves_with_path(state):
    import jax
    from flax import nnx
    return jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]


def param_infos(cfg) -> tuple[ParamInfo, ...]:
    """Shapes and logical names of every parameter (abstract: no memory is allocated)."""
    import json
    return _param_infos(json.dumps(cfg.model.to_dict(), sort_keys=True))


def _ways(names, shape, rules, sizes, what="parameter") -> list[tuple[str, ...]]:
    """Mesh axes sharding each dimension (raises UserError when a rule does not divide)."""
    spec = sharding.logical_to_spec(names, shape, rules, _MeshShape(sizes), what)
    out = []
    for entry in list(spec) + [None] * (len(shape) - len(spec)):
        out.append(() if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry)))
    return out


@functools.lru_cache(maxsize=65536)
def _param_ways(names, shape, preset: str, sizes: tuple) -> tuple[tuple[str, ...], ...]:
    """`_ways` of a parameter under a named preset, remembered: a search prices thousands of
    plans that share their parameters and most of their mesh sizes."""
    return tuple(_ways(names, shape, sharding.get_rules(preset), dict(sizes)))


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Cost:
    plan: Plan
    memory: dict[str, float]           # per-device bytes by component, and "total"
    comm: dict[str, float]             # bytes sent per device per step, "axis/link" -> bytes
    comm_by_kind: dict[str, float]     # full-buffer volume per step by collective kind
    compute_s: float
    comm_s: dict[str, float]           # "ici" / "dcn" seconds
    step_time_s: float
    mfu: float
    binding: str                       # what sets the step time
    fits: bool
    hbm_bytes: float
    units: dict[str, float] = dataclasses.field(default_factory=dict)  # memory-model inputs
    # full-buffer volume per step by the mesh axes of the group ("data+expert", mesh order), the
    # figure `hlo.volume_by_axes` reads where the compiler names the groups (XLA:CPU)
    volume_by_axes: dict[str, float] = dataclasses.field(default_factory=dict)
    reason: str = ""                   # one line: where the step time goes (steptime.predict)
    # seconds: compute, weight traffic not hidden, exposed ICI traffic, DCN (steptime.predict)
    time_parts: dict[str, float] = dataclasses.field(default_factory=dict)
    # what the step time was predicted from (steptime.predict's arguments; steptime.fit refits)
    step_inputs: dict = dataclasses.field(default_factory=dict)

    @property
    def bytes_per_device(self) -> float:
        return self.memory["total"]


# --------------------------------------------------------------------------- model families
def profile(cfg, required: bool = True):
    """The family's planner profile (`planner_profile` in its module, paxlike/family.py); if it
    has none, a UserError, or None when not `required`."""
    from paxlike import family
    hook = getattr(family.load(cfg.model), "planner_profile", None)
    if hook is None and required:
        raise UserError(f"the planner has no profile of model.module={cfg.model.module!r} (see "
                        f"paxlike/family.py); set the mesh by hand (--config.mesh.*) and check "
                        f"it with `python -m paxlike.aot --plan=config`")
    return hook(cfg.model) if hook else None


def has_profile(cfg) -> bool:
    return profile(cfg, required=False) is not None


# ------------------------------------------------------------------------------- the estimate
def _send_factor(kind: str, g: int, backend: str) -> float:
    """Bytes sent per device per byte of the full buffer, for a collective over g devices.

    TPU runs large FSDP gathers / reduce-scatters as bidirectional rings of collective-permutes
    overlapped with the matmul ("windowed einsum", g + 1 chunks) and small ones as plain ring
    collectives (g - 1 chunks): predicting g chunks is within 1/g of either.
    """
    if g <= 1:
        return 0.0
    if kind == "collective-permute":   # each device sends its whole operand once
        return 1.0
    if kind == "all-reduce":
        return 2.0 * (g - 1) / g
    if backend == "tpu" and kind in ("all-gather", "reduce-scatter"):
        return 1.0
    return (g - 1) / g


def estimate(cfg, plan: Plan, fleet: Fleet, backend: str | None = None) -> Cost:
    """The cost of training `cfg` with `plan` on `fleet` (UserError when the plan is invalid)."""
    backend = backend or ("cpu" if fleet.device.name == "cpu" else
                          "tpu" if fleet.device.torus_dims else "gpu")
    sizes, dcn = plan.sizes, plan.dcn_sizes
    rules = sharding.get_rules(plan.preset)
    acts = profile(cfg)
    infos = param_infos(cfg)
    # With a pipeline the layers run per microbatch in flight, the embedding and the head once
    # per step on the local rows B/W (paxlike/planner/pipeline.py). Its problems are said
    # first, as the trainer does.
    pipe = pipeline_model.layout(plan, sizes, pipeline_model.num_layer_blocks(infos))
    batch_axes = [a for a in rules["batch"] if sizes[a] > 1]
    batch_ways = math.prod(sizes[a] for a in batch_axes)
    mb = plan.microbatches
    # With a pipeline the batch is split over `pipeline` too outside the stages (embedding, head,
    # loss, the input), and a microbatch only over the other batch axes inside them
    # (paxlike.pipeline.stage_rules): the trainer's two checks.
    stages = sizes[pipeline_model.AXIS] if pipeline_model.AXIS in batch_axes else 1
    stage_ways = batch_ways // stages
    if stages > 1 and (cfg.batch_size % batch_ways or cfg.batch_size % (stage_ways * mb)):
        raise UserError(f"batch_size={cfg.batch_size} must divide by {batch_ways} batch shards "
                        f"and, per microbatch ({mb}), by the {stage_ways} inside a stage")
    if stages == 1 and cfg.batch_size % (batch_ways * mb):
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by {batch_ways} batch "
                        f"shards x {mb} microbatches")
    ctx = sizes["context"] if "context" in rules["length"] else 1
    context_axes = ["context"] if ctx > 1 else []
    if cfg.seq_len % ctx:
        raise UserError(f"seq_len={cfg.seq_len} is not divisible by mesh.context={ctx}")
    b, t = cfg.batch_size // (stage_ways * mb), cfg.seq_len // ctx
    tp = sizes["tensor"] if "tensor" in rules["heads"] else 1
    vocab_ways = sizes["tensor"] if "tensor" in rules["vocab"] else 1
    dt = acts.dt
    moe = isinstance(acts, MoEActivations)
    if moe:
        acts.configure(rules, sizes, cfg.batch_size, b, t, mb)
    # The model's global-batch statistics take one more forward pass with microbatches.
    stats = 1 if moe and mb > 1 and acts.stats_pass else 0
    if pipe and moe:
        raise UserError("the planner does not price pipelined mixture-of-experts plans yet; set "
                        "the mesh by hand and check it with `python -m paxlike.aot --plan=config`")
    layer_uses = pipe.weight_uses if pipe else mb   # the stacked weights' gathers / reductions
    head_uses = 1 if pipe else mb                   # the embedding's and the head's
    # the sequences those see at once: the local rows B/W (split over `pipeline` too)
    head_b = cfg.batch_size // batch_ways if pipe else b

    # An outer optimizer makes each `data` index a replica (paxlike/outer.py): no per-step
    # gradient sum over `data`; the outer step's traffic instead (`_outer_traffic`).
    opt_cfg = cfg.get("optimizer", {})
    outer_method = opt_cfg.get("outer", "none") if opt_cfg else "none"
    replica_axes = {"data"} if outer_method != "none" else set()
    memory = dict.fromkeys(("params", "grads", "optimizer", "batch", "activations",
                            "temporaries"), 0.0)
    comm: dict[str, float] = {}
    weight_comm: dict[str, float] = {}   # the part of `comm` that is weight / gradient traffic
    kinds = dict.fromkeys(("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                           "ragged-all-to-all", "collective-permute"), 0.0)
    launches = {"ici": 0.0, "dcn": 0.0}   # collectives per step, for their fixed latency
    by_axes: dict[str, float] = {}

    def send(kind: str, axes: list[str], full_bytes: float, times: float = 1.0,
             overlaps: bool = False):
        """Records a collective over `axes` on a buffer of `full_bytes`, run `times` per step;
        `overlaps`: traffic the step can overlap with compute (`steptime`): weights and
        gradients, and ring attention's blocks (each hop's transfer runs beside the previous
        block's attention), rather than activations on the critical path."""
        g = math.prod(sizes[a] for a in axes)
        if g <= 1 or full_bytes <= 0:
            return
        # The CPU backend reduces gradients with all-reduce where TPU uses reduce-scatter: the
        # full buffer is the same, the bytes on the wire double.
        real = "all-reduce" if backend == "cpu" and kind == "reduce-scatter" else kind
        sent = full_bytes * _send_factor(real, g, backend) * times
        kinds[real] += full_bytes * times
        group = "+".join(a for a in MESH_AXES if a in axes and sizes[a] > 1)
        by_axes[group] = by_axes.get(group, 0.0) + full_bytes * times
        # Split by link: the DCN part of the group carries the share that crosses granules.
        ici = math.prod(sizes[a] // dcn[a] for a in axes)
        share_dcn = 0.0 if ici == g else (g - ici) / g / ((g - 1) / g)
        if kind == "collective-permute" and ici != g:
            share_dcn = 1.0   # a ring's hops between granules: the busiest device sends on DCN
        launches["dcn" if share_dcn else "ici"] += times
        for a in axes:
            key_ici, key_dcn = f"{a}/ici", f"{a}/dcn"
            part = sizes[a] / sum(sizes[x] for x in axes) if len(axes) > 1 else 1.0
            for key, share in ((key_ici, 1 - share_dcn), (key_dcn, share_dcn)):
                if share:
                    comm[key] = comm.get(key, 0.0) + sent * share * part
                    if overlaps:
                        weight_comm[key] = weight_comm.get(key, 0.0) + sent * share * part

    layer_weights = 0.0   # one layer's and the head's gathered weights (compute dtype)
    run_bytes = {"layer": 0.0, "head": 0.0}   # weights one layer / head run reads from HBM
    tied = bool(cfg.model.get("tie_embeddings", False))   # the table is the head too
    local_layers = local_table = 0.0   # float32 bytes of the local stacked weights / table
    for p in infos:
        ways = _param_ways(p.names, p.shape, plan.preset, tuple(sizes.items()))
        shard_axes = {a for w in ways for a in w}
        # Axes that split the experts hold different weights, not shards to gather: the tokens
        # travel to them instead (paxlike/planner/moe.py).
        expert_axes = {a for n, w in zip(p.names, ways) if n == "experts" for a in w}
        local = math.prod(d // math.prod(sizes[a] for a in w) for d, w in zip(p.shape, ways))
        memory["params"] += 4 * local
        memory["optimizer"] += 8 * local
        memory["grads"] += 4 * local
        scanned = "layers" in p.names
        uses = layer_uses if scanned else head_uses
        local_layers += 4 * local if scanned else 0.0
        local_table += 4 * local if p.path in acts.lookup_params else 0.0
        depth = p.shape[p.names.index("layers")] if scanned else 1
        matrix = len([n for n in p.names if n != "layers"]) > 1
        f32 = moe and p.path.endswith(acts.float32_params)
        use_bytes = (dt if matrix and not f32 else 4) * local   # the shard, in the dtype it is used
        # Nor are pipeline stages: each holds its own layers ('layers' over `pipeline`).
        fsdp_axes = [a for a in batch_axes if a in shard_axes and a not in expert_axes
                     and not (scanned and a == pipeline_model.AXIS)]
        gathered = use_bytes * math.prod(sizes[a] for a in fsdp_axes)
        if scanned and matrix:
            layer_weights += gathered / depth
            # what one layer run reads: the device's layers are this shard's 'layers' rows
            local_depth = depth // math.prod(sizes[a] for a in ways[p.names.index("layers")])
            run_bytes["layer"] += gathered / local_depth
        elif matrix and p.path not in acts.lookup_params:
            layer_weights += gathered   # the output head, gathered whole once per microbatch
            run_bytes["head"] += gathered
        if p.path in acts.lookup_params and fsdp_axes:
            # The table is gathered row-wise by token: XLA moves activations, not weights.
            tokens = head_b * t
            send("all-to-all", fsdp_axes, tokens * acts.d / vocab_ways * dt, uses + stats * mb)
            ways = math.prod(sizes[a] for a in fsdp_axes)
            whole = tokens * ways * acts.d * 4
            if backend != "cpu" and vocab_ways > 1 and whole <= EMBED_GATHER_LIMIT:
                # TPU, vocabulary over `tensor`: the table's gradient is scattered from the f32
                # cotangent of every token of the microbatch, all-gathered whole over the
                # batch shards (f32[B, T, d] all-gathers on v5e and v5p).
                send("all-gather", fsdp_axes, whole, uses)
            else:
                send("all-to-all", fsdp_axes, tokens * acts.d / vocab_ways * 4, uses)
        elif fsdp_axes:
            gathers = (2 + stats) if scanned else 1
            if moe and "experts" in p.names:   # gathered into the experts' shard_map
                gathers = acts.expert_weight_gathers(plan.remat)
            if pipe and scanned:
                gathers = pipe.gathers(backend, plan.remat, p.names)
            send("all-gather", fsdp_axes, gathered, uses * gathers, overlaps=True)
            send("reduce-scatter", fsdp_axes, gathered, uses, overlaps=True)
        replicated = [a for a in batch_axes if a not in shard_axes and a not in replica_axes]
        if (moe or (pipe and backend != "cpu")) and p.path in acts.lookup_params:
            # The table's gradient is an f32 scatter-add: reduced in f32 (v5p MoE HLO). The
            # dense family keeps its figures (its CI plans shard the table over fsdp), except
            # over `pipeline` on TPU (v5p HLO of the pipelined AOT case: f32 over DCN).
            send("all-reduce", replicated, 4 * local, uses, overlaps=True)
        else:
            send("all-reduce", replicated, use_bytes, uses, overlaps=True)
        # Weights are replicated over `context` (it splits only the length): their gradients
        # are summed over it too, in a collective of its own (XLA:CPU HLO: with data 2 x
        # context 4 one all-reduce per axis, each of the whole local gradient).
        send("all-reduce", context_axes, use_bytes, uses, overlaps=True)
        if pipe and tied and p.path in acts.lookup_params and fsdp_axes:
            # A tied table is the head too. With a pipeline the head's rows are split over every
            # batch axis, and XLA gathers the table whole over the FSDP axes for it, like an
            # untied head, and reduces its gradient there (v5p HLO of the 125m AOT case: a bf16
            # all-gather and a bf16 all-reduce of the whole table over fsdp); on TPU the head's
            # part of the gradient is also summed over `pipeline` in the compute dtype, beside
            # the lookup's float32 sum above.
            layer_weights += gathered
            send("all-gather", fsdp_axes, gathered, uses, overlaps=True)
            send("reduce-scatter", fsdp_axes, gathered, uses, overlaps=True)
            if backend != "cpu":
                send("all-reduce", replicated, use_bytes, uses, overlaps=True)

    if outer_method != "none":
        _outer_traffic(send, memory, outer_method, int(opt_cfg.get("outer_every", 1)))
    if tp > 1:
        # the residual stream's sums over `tensor` per layer: the family's (its profile)
        per_layer = acts.tensor_sums_per_layer(backend, plan.remat) + 2 * stats
        layer_runs = pipe.layer_runs if pipe else mb * acts.layers   # per device
        send("all-reduce", ["tensor"], b * t * acts.d * dt, layer_runs * per_layer)
        send("all-reduce", ["tensor"], head_b * t * acts.d * 4,
             head_uses * (2 + stats))   # lookup, head dx
    if ctx > 1:   # the family's blocks exchange what crosses the sequence split (its profile)
        for kind, full_bytes, times, overlapped in acts.context_collectives(
                b, t, ctx, tp, plan.remat, backend):
            send(kind, ["context"], full_bytes,
                 times * (pipe.layer_runs if pipe else mb * acts.layers), overlaps=overlapped)
    if moe:
        acts.collectives(send, mb, plan.remat, backend, batch_axes)
    if pipe:
        pipeline_model.collectives(send, pipe, b, t, acts.d, dt, local_layers)

    memory["batch"] = 5 * 4 * cfg.batch_size * cfg.seq_len / (batch_ways * ctx)
    weight_ways = math.prod(sizes[a] for a in set(rules["embed"]) | set(rules["vocab"]))
    # The remat policy the layers run under: a pipeline's stages are vmapped over the stage
    # dimension, so every matmul in a layer has a batch dimension and save_dots saves as full.
    layer_remat = pipeline_model.layer_remat(plan.remat) if pipe else plan.remat
    if pipe:
        layer_saved = saved_bytes(cfg, acts, layer_remat, b, t, tp, weight_ways, vocab_ways,
                                  split=True, backend=backend)[0]
        rest_saved = saved_bytes(cfg, acts, plan.remat, head_b, t, tp, weight_ways, vocab_ways,
                                 split=True, backend=backend)[1]
        extra = pipeline_model.memory(pipe, layer_saved, rest_saved, b, t, acts.d, dt,
                                      local_layers, math.prod(sizes[a] for a in batch_axes),
                                      backend, plan.remat)
        saved = extra.pop("activations")
        head_saved = extra.pop("head_saved")
        memory.update(extra)
    else:
        saved = saved_bytes(cfg, acts, plan.remat, b, t, tp, weight_ways, vocab_ways,
                            routed=acts.routed_batch_array if moe else None, backend=backend)
    if moe:
        saved += acts.routed_saved(plan.remat, backend)
    units = dict(acts.units(b, t, tp, vocab_ways, ctx), gathered=layer_weights, saved=saved)
    if pipe:   # the loss runs on the local rows B/W
        units["logits"] = acts.units(head_b, t, tp, vocab_ways, ctx)["logits"]
    # the accumulator's partner; a pipeline has none: its backward scan adds each iteration's
    # layer gradients into the stage's gradient in place (XLA:CPU buffer assignments of the
    # fitted cases: one [S, R, K] accumulator at the peak in the stages' backward pass; v5p, 125m
    # AOT case: the peak is in the head's backward pass, with no second gradient)
    microbatch_grads = memory["grads"] if mb > 1 and not pipe else 0.0
    if backend == "cpu":
        # Derived from the model's shapes: the larger of the two candidate peaks (workingset.py).
        phases = acts.working_set(layer_remat, b, t, tp, vocab_ways, backend, context=ctx)
        if pipe:
            # the loss on the local rows B/W (split over `pipeline` too), beside the head's
            # residuals: they are freed by the head's backward pass, before the stages' one
            phases["loss"] = (acts.working_set(plan.remat, head_b, t, tp, vocab_ways,
                                               context=ctx)["loss"]
                              + head_saved)
        elif not acts.head_saved_at_layer_peak:   # freed by then (the family's profile)
            phases["layer_backward"] -= saved_bytes(
                cfg, acts, plan.remat, b, t, tp, weight_ways, vocab_ways, split=True,
                backend=backend)[2]
        units.update(phases)
        memory["activations"] = saved
        memory["temporaries"] = max(phases.values()) + microbatch_grads
    else:
        fit = calibration(fleet.device.name)
        if pipe:
            saved += head_saved
        memory["activations"] = fit["saved"] * saved
        # With microbatches the TPU compiler hoists the cast of every weight to the compute dtype
        # out of the microbatch loop: a compute-dtype copy of all local parameters lives through
        # the step (7b / v5e-16 buffer assignment: 0.69 GiB of bf16 layer weights).
        hoisted = memory["params"] * dt / 4 if mb > 1 and dt < 4 else 0.0
        memory["temporaries"] = (sum(fit[k] * units[k] for k in ("scores", "logits", "stream",
                                                                 "gathered"))
                                 + microbatch_grads + hoisted)
        if moe:   # the routed buffers of one MoE layer's backward pass (unfitted on TPU)
            memory["temporaries"] += acts.routed_working(plan.remat, backend)
    if moe:
        packing = acts.heap_packing(plan.remat, backend) - 1.0
        memory["heap_holes"] = packing * (memory["grads"] + memory["activations"]
                                          + memory["temporaries"])
    memory["total"] = sum(memory.values())

    # Time (paxlike/planner/steptime.py): compute at an achievable fraction of peak with HBM
    # floors; weight traffic hidden behind it; activation traffic and DCN on the critical path.
    n = math.prod(sizes.values())
    model_flops = acts.flops_per_step(cfg)
    tokens = cfg.batch_size * cfg.seq_len
    flops = model_flops + acts.flops_per_token_extra(plan.remat, cfg.seq_len, mb) * tokens
    peak = fleet.device.peak_flops * n
    head = acts.head_flops(tokens)
    layers = (flops - head) / (1.0 - pipe.bubble) if pipe else flops - head
    seconds = {k: v / _bandwidth(fleet, *k.split("/"), sizes, dcn) for k, v in comm.items()}
    inputs = dict(
        layer_flops=layers / n, layer_runs=pipe.layer_runs if pipe else mb * acts.layers,
        layer_weight_bytes=run_bytes["layer"], head_flops=head / n, head_runs=head_uses,
        head_weight_bytes=run_bytes["head"], remat=plan.remat, local_param_bytes=memory["params"],
        peak=fleet.device.peak_flops, hbm_bandwidth=fleet.device.hbm_bytes_per_s,
        comm_s=seconds,
        overlappable_s={k: v / _bandwidth(fleet, *k.split("/"), sizes, dcn)
                        for k, v in weight_comm.items()},
        latency_s={link: count * LATENCY_S[link] for link, count in launches.items()})
    timing = steptime.predict(**inputs)
    comm_s = {link: sum(v for k, v in seconds.items() if k.endswith(link)) for link in LATENCY_S}
    fits = memory["total"] <= fleet.device.hbm_bytes
    mfu = model_flops / (timing.seconds * peak)
    return Cost(plan, memory, comm, {k: v for k, v in kinds.items() if v},
                timing.parts["compute"], comm_s, timing.seconds, mfu, timing.binding, fits,
                fleet.device.hbm_bytes, units, by_axes, timing.reason, timing.parts, inputs)


def _outer_traffic(send, memory: dict, method: str, every: int) -> None:
    """An outer optimizer's state and traffic (paxlike/outer.py), per step: every replica's own
    float32 parameters and the outer momentum (NoLoCo: its own outer parameters too; CO2: its
    unreduced pseudo-gradient); each `every` steps DiLoCo and CO2 all-reduce one float32 copy of
    the local parameters over `data` (CO2's may overlap the step), NoLoCo permutes two (its
    pseudo-gradient and outer parameters, to one peer). Streaming DiLoCo moves the same bytes
    per `every` steps, a fragment at a time."""
    local = memory["params"]   # float32 bytes of the local parameters
    extra = {"diloco": 1, "co2": 2, "noloco": 2}[method]
    memory["params"] += local
    memory["optimizer"] += extra * local
    # The outer step's program holds more float32 copies beside the inner step's peak (the
    # replicas' mean and the pseudo-gradient; NoLoCo the peer's two arrays and the local
    # pseudo-gradient): read from XLA:CPU compiles (docs/lowcomm.md), priced so that the
    # program that syncs fits too.
    memory["outer_step"] = (3 if method == "noloco" else 2) * local
    if method == "noloco":
        send("collective-permute", ["data"], local, 2.0 / every)
    else:
        send("all-reduce", ["data"], local, 1.0 / every, overlaps=method == "co2")


def _bandwidth(fleet: Fleet, axis: str, link: str, sizes, dcn) -> float:
    """Bytes/s one device sends for a collective along `axis` over `link`."""
    device = fleet.device
    if link == "dcn":
        return device.dcn_bytes_per_s
    if not device.torus_dims:
        return device.ici_bytes_per_s
    # A ring along a torus dimension uses both directions of the wraparound: 2 links. An axis
    # spread over k physical dimensions drives 2k links.
    ici = sizes[axis] // dcn[axis]
    side = max(fleet.torus) if fleet.torus else 1
    k = min(device.torus_dims, max(1, math.ceil(math.log(ici, side)))) if side > 1 else 1
    return 2 * k * device.ici_bytes_per_s
