"""Cost model: per-device memory, communication per link, step time and MFU of one plan.

A *plan* is what the trainer needs to run a config on a fleet: mesh sizes per axis (with the part
of each axis that crosses DCN), a sharding preset, microbatches and a remat policy. The model is
analytic and fast (~1 ms per plan once the parameter shapes are known), and it is checked against
the compiler: tests/test_planner.py and tests/test_aot.py compare its bytes with XLA's memory
analysis and its collective bytes with the optimized HLO (`paxlike.planner.hlo`).

Parameters, gradients and optimizer state are exact: they come from the model's own parameter
shapes and logical axis names, sharded by the same rules code the trainer uses
(`paxlike.sharding.logical_to_spec`). Activations and the transient working set come from the
model family's `ActivationModel` (the Llama-style Transformer is the one family so far; a new
family adds its own class here, keyed by `model.module`).

Communication is counted as bytes *sent per device per step*, the same figure
`paxlike.planner.hlo` reads from compiled programs, per mesh axis and link (ICI / DCN). Pipeline,
expert and context axes plug in as further `_axis_traffic` terms when those parallelisms land;
today the planner keeps them at 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from paxlike import sharding
from paxlike.errors import UserError
from paxlike.mesh import MESH_AXES
from paxlike.planner.fleets import Fleet

REMATS = ("none", "save_dots", "full")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[tuple[str, int], ...]     # all six axes, total sizes
    dcn: tuple[tuple[str, int], ...]      # the DCN part of each axis
    preset: str
    microbatches: int
    remat: str

    @staticmethod
    def make(mesh: dict, dcn: dict | None = None, preset: str = "fsdp_tp", microbatches: int = 1,
             remat: str = "none") -> "Plan":
        return Plan(tuple((a, int(mesh.get(a, 1))) for a in MESH_AXES),
                    tuple((a, int((dcn or {}).get(a, 1))) for a in MESH_AXES),
                    preset, microbatches, remat)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def dcn_sizes(self) -> dict[str, int]:
        return dict(self.dcn)

    def apply(self, cfg) -> None:
        """Writes this plan into a trainer config (mesh, dcn, sharding, microbatches, remat)."""
        for axis, size in self.mesh:
            cfg.mesh[axis] = size
        for axis, size in self.dcn:
            cfg.mesh.dcn[axis] = size
        cfg.sharding, cfg.microbatches, cfg.model.remat = self.preset, self.microbatches, self.remat

    def describe(self) -> str:
        parts = []
        for axis, size in self.mesh:
            if size > 1:
                d = self.dcn_sizes[axis]
                parts.append(f"{axis}={size}" + (f"(dcn {d})" if d > 1 else ""))
        return " ".join(parts) or "1 device"


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

    from paxlike.config import model_module
    model_cfg = ml_collections.ConfigDict(json.loads(model_key))
    module = model_module(ml_collections.ConfigDict({"model": model_cfg}))
    abstract = nnx.eval_shape(lambda: module.build(model_cfg, nnx.Rngs(0)))
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

    @property
    def bytes_per_device(self) -> float:
        return self.memory["total"]


# ------------------------------------------------------------------------ the Transformer family
class TransformerActivations:
    """Activation bytes of the Llama-style Transformer (models/transformer.py) per device.

    Saved for the backward pass, per layer and token (the scan keeps one copy per layer):
      full:      the layer input only (everything else is recomputed)
      save_dots: the input plus every matmul output (q, k, v, attention projection, gate, up, down)
      none:      additionally the norms, rotary outputs, attention probabilities and MLP activations
    The transient working set is the largest of: one layer's attention scores being recomputed and
    differentiated, the logits with their softmax and gradient, and one layer's gathered weights.
    """

    def __init__(self, cfg):
        m = cfg.model
        self.d, self.h, self.kv = m.d_model, m.num_heads, m.num_kv_heads
        self.hd = m.head_dim or m.d_model // m.num_heads
        self.mlp, self.vocab, self.layers = m.mlp_dim, m.vocab_size, m.num_layers
        self.dt = _DTYPE_BYTES[m.compute_dtype]

    def per_layer_saved(self, remat: str, b: int, t: int, tp: int) -> float:
        """Bytes saved per layer for b local sequences of t tokens, heads/mlp split tp ways."""
        tokens, dt = b * t, self.dt
        x = self.d * dt
        if remat == "full":
            return tokens * x
        dots = (self.h * self.hd + 2 * self.kv * self.hd + 2 * self.mlp) / tp * dt + 2 * x
        if remat == "save_dots":
            return tokens * (x + dots)
        # none: also the two f32 norm inputs, rotated q/k, silu(gate)*up, softmax probabilities
        extra = 2 * self.d * 4 + (self.h + self.kv) * self.hd / tp * dt + self.mlp / tp * dt
        probs = b * self.h / tp * t * t * dt
        return tokens * (x + dots + extra) + probs

    def transient(self, remat: str, b: int, t: int, tp: int, vocab_ways: int,
                  layer_weight_bytes: float) -> dict[str, float]:
        """Candidates for the working set beyond saved activations (the largest one counts)."""
        scores = b * (self.h / tp) * t * t * 4           # f32 scores of one layer
        logits = b * t * self.vocab / vocab_ways * 4     # f32 logits of the microbatch
        return {"attention": 3 * scores, "logits": 3 * logits, "weights": 2 * layer_weight_bytes}

    lookup_params = ("embed",)   # tables read by token (jnp.take), not multiplied

    @staticmethod
    def flops_per_step(cfg) -> float:
        from paxlike.config import model_module
        return model_module(cfg).flops_per_token(cfg.model, cfg.seq_len) * cfg.batch_size * cfg.seq_len

    def flops_per_token_extra(self, remat: str, seq_len: int) -> float:
        """Recomputation FLOPs per token added by remat (beyond the 6N model FLOPs)."""
        d, hd, L = self.d, self.hd, self.layers
        matmul = L * (d * hd * (2 * self.h + 2 * self.kv) + 3 * d * self.mlp)
        attn = L * 4 * self.h * hd * seq_len
        if remat == "full":
            return 2 * matmul + attn
        if remat == "save_dots":
            return attn
        return 0.0


ACTIVATION_MODELS = {"models.transformer": TransformerActivations}


def activation_model(cfg):
    name = cfg.model.get("module")
    if name not in ACTIVATION_MODELS:
        raise UserError(f"the planner has no activation model for model.module={name!r}; "
                        f"known: {', '.join(ACTIVATION_MODELS)}")
    return ACTIVATION_MODELS[name](cfg)


# ------------------------------------------------------------------------------- the estimate
def _send_factor(kind: str, g: int, backend: str) -> float:
    """Bytes sent per device per byte of the full buffer, for a collective over g devices.

    TPU runs large FSDP gathers / reduce-scatters as bidirectional rings of collective-permutes
    overlapped with the matmul ("windowed einsum", g + 1 chunks) and small ones as plain ring
    collectives (g - 1 chunks): predicting g chunks is within 1/g of either.
    """
    if g <= 1:
        return 0.0
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
    acts = activation_model(cfg)
    batch_axes = [a for a in rules["batch"] if sizes[a] > 1]
    batch_ways = math.prod(sizes[a] for a in batch_axes)
    mb = plan.microbatches
    if cfg.batch_size % (batch_ways * mb):
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by {batch_ways} batch "
                        f"shards x {mb} microbatches")
    ctx = sizes["context"] if "context" in rules["length"] else 1
    if cfg.seq_len % ctx:
        raise UserError(f"seq_len={cfg.seq_len} is not divisible by mesh.context={ctx}")
    b, t = cfg.batch_size // (batch_ways * mb), cfg.seq_len // ctx
    tp = sizes["tensor"] if "tensor" in rules["heads"] else 1
    vocab_ways = sizes["tensor"] if "tensor" in rules["vocab"] else 1
    dt = acts.dt

    memory = dict.fromkeys(("params", "grads", "optimizer", "batch", "activations",
                            "temporaries"), 0.0)
    comm: dict[str, float] = {}
    kinds = dict.fromkeys(("all-gather", "reduce-scatter", "all-reduce", "all-to-all"), 0.0)

    def send(kind: str, axes: list[str], full_bytes: float, times: float = 1.0):
        """Records a collective over `axes` on a buffer of `full_bytes`, run `times` per step."""
        g = math.prod(sizes[a] for a in axes)
        if g <= 1 or full_bytes <= 0:
            return
        # The CPU backend reduces gradients with all-reduce where TPU uses reduce-scatter: the
        # full buffer is the same, the bytes on the wire double.
        real = "all-reduce" if backend == "cpu" and kind == "reduce-scatter" else kind
        sent = full_bytes * _send_factor(real, g, backend) * times
        kinds[real] += full_bytes * times
        # Split by link: the DCN part of the group carries the share that crosses granules.
        ici = math.prod(sizes[a] // dcn[a] for a in axes)
        share_dcn = 0.0 if ici == g else (g - ici) / g / ((g - 1) / g)
        for a in axes:
            key_ici, key_dcn = f"{a}/ici", f"{a}/dcn"
            part = sizes[a] / sum(sizes[x] for x in axes) if len(axes) > 1 else 1.0
            comm[key_ici] = comm.get(key_ici, 0.0) + sent * (1 - share_dcn) * part
            if share_dcn:
                comm[key_dcn] = comm.get(key_dcn, 0.0) + sent * share_dcn * part

    layer_weights = 0.0   # one layer's gathered matmul weights (compute dtype)
    for p in param_infos(cfg):
        ways = _ways(p.names, p.shape, rules, sizes)
        shard_axes = {a for w in ways for a in w}
        local = math.prod(d // math.prod(sizes[a] for a in w) for d, w in zip(p.shape, ways))
        memory["params"] += 4 * local
        memory["optimizer"] += 8 * local
        memory["grads"] += 4 * local
        scanned = "layers" in p.names
        depth = p.shape[p.names.index("layers")] if scanned else 1
        matrix = len([n for n in p.names if n != "layers"]) > 1
        use_bytes = (dt if matrix else 4) * local          # the shard, in the dtype it is used
        fsdp_axes = [a for a in batch_axes if a in shard_axes]
        gathered = use_bytes * math.prod(sizes[a] for a in fsdp_axes)
        if scanned and matrix:
            layer_weights += gathered / depth
        if p.path in acts.lookup_params and fsdp_axes:
            # The table is gathered row-wise by token: XLA moves activations, not weights.
            tokens = b * t
            send("all-to-all", fsdp_axes, tokens * acts.d / vocab_ways * dt, mb)
            send("all-to-all", fsdp_axes, tokens * acts.d / vocab_ways * 4, mb)
        elif fsdp_axes:
            send("all-gather", fsdp_axes, gathered, mb * (2 if scanned else 1))
            send("reduce-scatter", fsdp_axes, gathered, mb)
        replicated = [a for a in batch_axes if a not in shard_axes]
        send("all-reduce", replicated, use_bytes, mb)

    if tp > 1:
        per_layer = {"none": 4, "save_dots": 4, "full": 6}[plan.remat]
        tokens = b * t
        send("all-reduce", ["tensor"], tokens * acts.d * dt, mb * acts.layers * per_layer)
        send("all-reduce", ["tensor"], tokens * acts.d * 4, mb * 2)   # embedding lookup, head dx

    memory["batch"] = 5 * 4 * cfg.batch_size * cfg.seq_len / (batch_ways * ctx)
    saved = acts.layers * acts.per_layer_saved(plan.remat, b, t, tp)
    memory["activations"] = saved
    transient = acts.transient(plan.remat, b, t, tp, vocab_ways, layer_weights)
    memory["temporaries"] = max(transient.values()) + (memory["grads"] if mb > 1 else 0.0)
    memory["total"] = sum(memory.values())

    # Time: compute at the device's peak; communication per link at its bandwidth; overlapped.
    n = math.prod(sizes.values())
    model_flops = acts.flops_per_step(cfg)
    flops = model_flops + acts.flops_per_token_extra(plan.remat, cfg.seq_len) * cfg.batch_size * cfg.seq_len
    peak = fleet.device.peak_flops * n
    compute_s = flops / peak
    comm_s = {"ici": 0.0, "dcn": 0.0}
    slowest = ("compute", compute_s)
    for key, value in comm.items():
        axis, link = key.split("/")
        seconds = value / _bandwidth(fleet, axis, link, sizes, dcn)
        comm_s[link] += seconds
    for link, seconds in comm_s.items():
        if seconds > slowest[1]:
            busiest = max((k for k in comm if k.endswith(link)), key=lambda k: comm[k])
            slowest = (f"{link.upper()} ({busiest.split('/')[0]} traffic)", seconds)
    step = slowest[1]
    fits = memory["total"] <= fleet.device.hbm_bytes
    return Cost(plan, memory, comm, {k: v for k, v in kinds.items() if v}, compute_s, comm_s,
                step, model_flops / (step * peak), slowest[0], fits, fleet.device.hbm_bytes)


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
