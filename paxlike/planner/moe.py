"""The mixture-of-experts Transformer (models/moe.py) in the cost model: its dispatch layout on a
mesh, the collectives of expert parallelism, the routed arrays it keeps, and its FLOPs
(docs/planner.md, "Mixture of experts", has the figures).

Everything the dense Transformer has (attention, the dense layers of `moe_every > 1`, the head,
the embedding) is priced by `cost.estimate` as for the dense family, with three changes there:
axes that shard a weight's `experts` dimension are not FSDP axes (expert weights are never
gathered over them: the tokens travel instead), the router weight is used in float32, and the
embedding table's gradient is reduced in float32. Parameters and optimizer state of the experts
come from the model's own shapes and logical names like every other weight. Added here, per MoE
layer, microbatch and device:

Dispatch (how models/moe.py routes, `MoEActivations.configure`):
  ep        dropless with `experts` sharded over mesh axes (the "EP group", P devices): the
            experts' shard_map (kernels/moe/expert_parallel.py). n local tokens (b·t, divided by
            the EP axes the tokens are not split over: `fold_tensor`'s `tensor`), r = n·k rows
            sent, R = r·P rows received: the worst case, every buffer past the exchange has it.
  capacity  `capacity_factor > 0`: GShard groups of one sequence, C = ceil(t·k/E·factor) slots
            per expert; each device's [b, E, C, d] buffer goes to the experts' devices (R = b·E·C).
  local     experts not sharded: every device runs its own tokens through all experts,
            gathered whole (`sharding.per_shard`), R = n·k.
Not priced (UserError: the search skips the plan): the reference dispatch, a sequence split
over mesh axes, capacity with `fold_tensor`, and gathered-whole experts over `tensor`.

Collectives (`collectives`; the volumes `paxlike.planner.hlo` reads, read off the XLA:CPU HLO of
tests/test_planner_moe.py's cases and the v5p HLO of an expert-parallel step):
  ep, forward   all-gather of the [P, E] int32 expert counts; the dispatch and the return
                exchange: CPU / GPU (`padded`) an all-to-all of a [P, r, d] buffer each (plus a
                [P] int32 all-to-all of landing offsets), TPU (`ragged`) a ragged all-to-all of
                r rows each; with `mlp` split inside the experts a psum of the [n, d] output
                over those axes; with EP axes the tokens are not split over, an all-gather of
                the output over them.
  ep, backward  the two exchanges transposed (same volumes), the output psum transposed, the
                all-gather transposed (a reduce-scatter), and a psum of the input's cotangent
                [n, d] (+ the [n, k] float32 combine weights') over every mesh axis the tokens
                are replicated over inside the shard_map.
  capacity      the buffer's all-to-all, forward and backward; the combined rows of the EP
                group's tokens [b·t·P, k, d] all-reduced (forward) / all-gathered (backward),
                with their int32 slots gathered alongside.
  router        XLA:CPU all-gathers the router probabilities [B, T, E] float32 of the global
                microbatch over the batch axes (forward); the TPU compiler does not.
  Under remat (`full` and `save_dots`: the exchanges are not dots) the forward ones run again in
  the backward pass. With microbatches, the model's global-batch statistics (expert counts, for
  the load-balancing loss) take one more forward pass over every microbatch first
  (paxlike/step.py): every forward collective of the layers runs once more (`stats_pass`).
  Expert weights enter the shard_map gathered over `fsdp` once per forward pass (the backward
  reuses that copy unless remat recomputes it). XLA:CPU runs the exchanges in float32 whatever
  the compute dtype (seen in a bfloat16 compile); other backends in the compute dtype.

Memory: the routed arrays are not taken from the traced residuals (the planner traces the model
on one device, where they are the single-device path's flattened [N·k, ...] arrays;
`residuals.saved_bytes` drops them, told apart by a second trace at another batch size) but counted
from the layout (ROW_COUNTS and kin: integer counts of arrays of the layer's sizes, read off
XLA:CPU buffer assignments), saved for the backward pass and live at the last MoE layer's
backward peak (`working_set`). XLA:CPU packs a MoE step's heap with holes (CPU_HEAP_PACKING,
fitted). TPU: R x f / R x d arrays fitted to one v5p compile (TPU_WORKING).

FLOPs: the model FLOPs count the k routed and the shared experts and the router
(`models/moe.py` flops_per_token); `flops_per_token_extra` adds capacity padding, remat's
recomputation and the statistics pass.
"""

from __future__ import annotations

import dataclasses
import math

from paxlike.errors import UserError
from paxlike.planner.workingset import Profile

# Routed arrays of one MoE layer, per device, counted in XLA:CPU's buffer assignment (module
# docstring), in units of the layer's own sizes: float32 (or 4-byte) arrays of R rows x f and of
# padded rows x f (CPU's tiled grouped matmul pads every local expert's rows to whole tiles of
# TILE_ROWS), the same x d, tile weights (that matmul gathers its expert's weight for every
# tile: tiles x d x f, float32) and byte masks of R x f / R x d. `saved`: kept for the backward
# pass (stacked over the layers); `working`: live at one layer's backward peak beyond them.
# Expert parallelism adds the exchange's buffers (EP_EXTRA: masks saved, d-row buffers live).
ROW_COUNTS = {  # (R x f, padded x f, R x d, padded x d, tile weights, f masks, d masks)
    "saved": {"none": (5, 1, 0, 2, 2, 4, 5), "save_dots": (0,) * 7, "full": (0,) * 7},
    "working": {"none": (2, 3, 2, 3, 1, 0, 0), "save_dots": (1, 9, 2, 7, 3, 0, 0),
                "full": (1, 8, 2, 6, 3, 0, 0)},
}
EP_EXTRA = {"saved": {"none": 3, "save_dots": 0, "full": 0},           # d masks
            "working": {"none": 4, "save_dots": 5, "full": 7}}         # R x d buffers
# Capacity: f-sized and d-sized arrays of the b·E·C buffer rows a device holds (its own
# sequences' buffers before the exchange, its experts' slots of P times as many after).
CAPACITY_SAVED = {"none": (6, 1), "save_dots": (0, 0), "full": (0, 0)}
CAPACITY_WORKING = {"none": (4, 0), "save_dots": (8, 2), "full": (8, 2)}
# TPU (megablox grouped matmuls: no tiles, no padding masks): R x f and R x d arrays live at the
# backward peak, fitted to one v5p compile of an expert-parallel step under remat `full`
# (docs/planner.md, "Mixture of experts"); the other policies keep the CPU counts, unverified.
TPU_WORKING = {"none": (5, 11), "save_dots": (1, 1), "full": (1, 1)}
TILE_ROWS = 128   # kernels/moe/grouped.py XLA_TILE: rows per tile of the CPU grouped matmul
# XLA:CPU packs a MoE step's temporaries (gradients, saved activations, working set) into its
# heap with holes: the heap is this much larger than the most bytes ever live at once (1.26 -
# 1.39 without remat or under save_dots, 1.00 - 1.10 under full remat, on every case of
# tests/test_planner_moe.py). Fitted on the expert8 cases (none 1.26, save_dots 1.32, full
# 1.02); the other cases are held out (docs/planner.md). The dense Transformer's heap packs
# without holes (workingset.py), so this is the MoE family's only.
CPU_HEAP_PACKING = {"none": 1.29, "save_dots": 1.29, "full": 1.0}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one MoE layer's work lands on a mesh (per device, per microbatch)."""
    mode: str                        # "ep" | "capacity" | "local"
    ep_axes: tuple[str, ...]         # mesh axes the experts are split over (size > 1)
    token_axes: tuple[str, ...]      # mesh axes the tokens are split over
    replicated_axes: tuple[str, ...]  # EP axes the tokens are not split over (each takes 1/size)
    reduce_axes: tuple[str, ...]     # mesh axes splitting f inside the experts (output psum)
    grad_axes: tuple[str, ...]       # mesh axes the EP input is replicated over (cotangent psum)
    ep: int                          # P
    tokens: int                      # n: tokens one device dispatches
    tokens_full: int                 # local tokens before the replicated slice
    global_tokens: int               # N: tokens of the global microbatch
    experts_local: int
    f_local: int
    rows: int                        # R: expert-side rows per device (worst case for EP)
    capacity: int                    # C (capacity mode), else 0
    seq: int                         # tokens per sequence (a capacity group)


class MoEActivations(Profile):
    """The experts' part of the MoE family's planner profile (module docstring). models/moe.py
    declares the profile as this on top of the Transformer's (`class Profile(MoEActivations,
    transformer.Profile)`), which supplies the attention, the dense layers and their counts."""

    float32_params = ("router/w",)   # used in float32 (x.astype(f32) @ w): gathered as such
    def __init__(self, model_cfg):
        super().__init__(model_cfg)
        m = model_cfg
        # Global-batch balancing reads every microbatch's expert counts before its loss: one
        # more forward per microbatch (paxlike/step.py); the other scopes need no such pass.
        self.stats_pass = m.load_balance == "global_batch"
        self.experts, self.k = m.num_experts, m.experts_per_token
        self.f = m.expert_mlp_dim or m.mlp_dim
        self.moe_every, self.moe_layers = m.moe_every, m.num_layers // m.moe_every
        self.shared = m.num_shared_experts
        self.capacity_factor = float(m.capacity_factor)
        self.reference = m.get("moe_dispatch", "auto") == "reference"
        self.layout: Layout | None = None
        self.microbatches = 1

    # ------------------------------------------------------------------------------ layout
    def configure(self, rules, sizes, batch: int, b: int, t: int, mb: int) -> Layout:
        """The dispatch layout of a plan (UserError for the layouts the model does not price).
        batch: global batch; b, t: local sequences and tokens per sequence of a microbatch."""
        big = lambda axes: tuple(a for a in axes if sizes.get(a, 1) > 1)
        ep_axes = big(rules["experts"])
        token_axes = big(tuple(rules["batch"]) + tuple(rules["length"]))
        replicated = tuple(a for a in ep_axes if a not in token_axes)
        reduce_axes = tuple(a for a in big(rules["mlp"]) if a not in ep_axes)
        grad_axes = tuple(a for a in sizes if sizes[a] > 1 and a not in token_axes)
        ep = math.prod(sizes[a] for a in ep_axes)
        split = math.prod(sizes[a] for a in replicated)
        tokens_full = b * t
        if tokens_full % split:
            raise UserError(f"{tokens_full} local tokens do not split over the {split} devices "
                            f"of {'x'.join(replicated)} inside the MoE block")
        n = tokens_full // split
        f_local = self.f // math.prod(sizes[a] for a in reduce_axes)
        experts_local = self.experts // ep
        global_tokens = batch // mb * t
        capacity = 0
        if self.reference:
            raise UserError("moe_dispatch='reference' runs every expert on every token; the "
                            "planner prices the routed dispatch paths only")
        if big(rules["length"]):
            raise UserError("the planner does not price a sequence split over mesh axes "
                            "(context parallelism, the fold_context preset)")
        if self.capacity_factor > 0:
            # GShard groups: one per sequence, C slots per expert and sequence; the [B, E, C, d]
            # buffer keeps B on the batch axes without experts and E on the expert axes.
            mode = "capacity"
            capacity = math.ceil(t * self.k / self.experts * self.capacity_factor)
            if replicated:
                raise UserError("capacity dispatch with experts over axes the batch is not "
                                "split over (fold_tensor) is not priced by the planner")
            rows = b * self.experts * capacity
        elif ep > 1:
            mode, rows = "ep", n * self.k * ep
        else:
            # Each device runs its own tokens through every expert, gathered whole
            # (sharding.per_shard): FSDP-like gathers, priced with the other weights.
            if reduce_axes:
                raise UserError(f"dropless MoE without expert parallelism gathers the experts "
                                f"whole, also over {'x'.join(reduce_axes)} where the tokens "
                                f"are replicated (every device of it repeats the experts' "
                                f"work); the planner does not price it")
            mode, rows, experts_local = "local", n * self.k, self.experts
        self.microbatches = mb
        self.layout = Layout(mode, ep_axes, token_axes, replicated, reduce_axes, grad_axes, ep,
                             n, tokens_full, global_tokens, experts_local, f_local, rows,
                             capacity, t)
        return self.layout

    # --------------------------------------------------------------------------- traffic
    def collectives(self, send, mb: int, remat: str, backend: str, batch_axes) -> None:
        """Records the MoE layers' collectives of one step with `send(kind, axes, bytes, times)`
        (module docstring); `batch_axes`: the mesh axes (size > 1) the batch is split over."""
        lay, d, k = self.layout, self.d, self.k
        cx = 4 if backend == "cpu" else self.dt       # XLA:CPU exchanges in float32
        forward = mb * self.moe_layers * (1 + (remat != "none") + (mb > 1 and self.stats_pass))
        backward = mb * self.moe_layers
        if backend == "cpu":
            # The router's probabilities, gathered whole over the batch axes (forward; the TPU
            # compiler does without: v5p HLO).
            send("all-gather", list(batch_axes), lay.global_tokens * self.experts * 4, forward)
        if lay.mode == "ep":
            ep = list(lay.ep_axes)
            rows = lay.tokens * k
            send("all-gather", ep, lay.ep * self.experts * 4, forward)       # expert counts
            if backend == "tpu":
                send("ragged-all-to-all", ep, rows * d * cx, 2 * (forward + backward))
            else:
                send("all-to-all", ep, lay.ep * rows * d * cx, 2 * (forward + backward))
                send("all-to-all", ep, lay.ep * 4, 2 * forward)              # landing offsets
            out = lay.tokens * d * cx
            send("all-reduce", list(lay.reduce_axes), out, forward + backward)
            full = lay.tokens_full * d * cx
            send("all-gather", list(lay.replicated_axes), full, forward)
            send("reduce-scatter", list(lay.replicated_axes), full, backward)
            send("all-reduce", list(lay.grad_axes), full + lay.tokens_full * k * 4, backward)
        elif lay.mode == "capacity" and lay.ep > 1:
            ep = list(lay.ep_axes)
            # The [b, E, C, d] buffer to the experts' devices and back (the buffer's gather and
            # the transposed scatter); the combine gathers the rows [b·t·P, k, d] of the tokens
            # of the EP group masked on each device and all-reduces them (backward: all-gathers
            # their cotangent), with int32 slot indices gathered alongside.
            send("all-to-all", ep, lay.rows * d * cx, forward + backward)
            rows = lay.tokens_full * lay.ep * k
            send("all-reduce", ep, rows * d * cx, forward)
            send("all-gather", ep, rows * d * cx, backward)
            send("all-gather", ep, rows * 4, forward + backward)

    def expert_weight_gathers(self, remat: str) -> int:
        """FSDP gathers of an expert weight per microbatch: it enters the experts' shard_map
        gathered, and autodiff keeps that copy for the backward pass unless remat recomputes it
        (`full`; `save_dots`: a gather is not a dot); the statistics pass gathers once more."""
        return 1 + (remat != "none") + int(self.microbatches > 1 and self.stats_pass)

    def tensor_sums_per_layer(self, backend: str, remat: str) -> float:
        """Tensor-parallel all-reduces of the residual stream per layer, averaged over the
        layers: a MoE layer keeps the attention's (forward: its output; backward: q, k, v
        separately on CPU, once on TPU; remat `full` recomputes the forward one) and sums its
        experts' output in `collectives` instead of the dense MLP's; shared experts are a dense
        SwiGLU with the dense MLP's sums (forward: its output; backward: gate and up, separately
        on CPU, once on TPU; recomputed under full remat on CPU). Unchecked against a compile."""
        dense = super().tensor_sums_per_layer(backend, remat)
        moe = (1 + (3 if backend == "cpu" else 1)) + (remat == "full")
        if self.shared:
            moe += 1 + (2 if backend == "cpu" else 1) + (remat == "full" and backend == "cpu")
        return ((self.layers - self.moe_layers) * dense + self.moe_layers * moe) / self.layers

    # ---------------------------------------------------------------------------- memory
    def _routed(self, which: str, remat: str, backend: str) -> float:
        """Per-device bytes of one MoE layer's routed arrays (ROW_COUNTS and kin)."""
        lay, d, f, R = self.layout, self.d, self.layout.f_local, self.layout.rows
        if lay.mode == "capacity":
            f_rows, d_rows = (CAPACITY_SAVED if which == "saved" else CAPACITY_WORKING)[remat]
            return R * 4 * (f_rows * f + d_rows * d)
        if backend != "cpu":
            if which == "saved":
                f_rows, d_rows = ROW_COUNTS["saved"][remat][0], 0
            else:
                f_rows, d_rows = TPU_WORKING[remat]
            return R * 4 * (f_rows * f + d_rows * d)
        fr, fp, dr, dp, tile_weights, f_masks, d_masks = ROW_COUNTS[which][remat]
        if lay.mode == "ep":
            if which == "saved":
                d_masks += EP_EXTRA["saved"][remat]
            else:
                dr += EP_EXTRA["working"][remat]
        tile = min(TILE_ROWS, -(-R // 8) * 8)
        tiles = -(-R // tile) + lay.experts_local
        padded = tiles * tile
        return (4 * (R * (fr * f + dr * d) + padded * (fp * f + dp * d))
                + tiles * tile_weights * 4 * d * f + R * (f_masks * f + d_masks * d))

    def heap_packing(self, remat: str, backend: str) -> float:
        """Heap size over the peak of live temporaries (CPU_HEAP_PACKING; 1 elsewhere: the TPU
        fit holds its own)."""
        return CPU_HEAP_PACKING[remat] if backend == "cpu" else 1.0

    def routed_batch_array(self, shape) -> bool:
        """Whether a traced residual with a batch dimension is a capacity buffer [.., E, C, ..]
        (counted by `routed_saved` instead)."""
        lay = self.layout
        if lay is None or lay.mode != "capacity":
            return False
        return any(a == self.experts and c == lay.capacity for a, c in zip(shape, shape[1:]))

    def routed_saved(self, remat: str, backend: str = "cpu") -> float:
        """Per-device bytes of the routed arrays all MoE layers save for the backward pass (and,
        off CPU, of the expert weights' copies the grouped matmul keeps without remat)."""
        lay = self.layout
        weights = 0.0
        if remat == "none" and backend != "cpu":   # megablox keeps its weight operand
            weights = 3 * lay.experts_local * self.d * lay.f_local * self.dt
        return self.moe_layers * (self._routed("saved", remat, backend) + weights)

    def routed_working(self, remat: str, backend: str) -> float:
        """Per-device bytes of the routed arrays live at one MoE layer's backward peak."""
        return self._routed("working", remat, backend)

    def working_set(self, remat: str, b: int, t: int, tp: int, vocab_ways: int,
                    backend: str = "cpu", context: int = 1) -> dict[str, float]:
        """The dense candidates (a dense layer's backward only when there are dense layers) and
        the backward pass of the last MoE layer (module docstring)."""
        phases = super().working_set(remat, b, t, tp, vocab_ways, context=context)
        if self.moe_every == 1:
            phases.pop("layer_backward")
        lay, d = self.layout, self.d
        u = self.units(b, t, tp, vocab_ways, context)
        common = u["scores"] + self.STREAM_ARRAYS * u["stream"] + u["embed_grad"]
        weights = (self.dt + 4) * 3 * lay.experts_local * d * lay.f_local   # copies, f32 grads
        phases["moe_backward"] = self._routed("working", remat, backend) + common + weights
        return phases

    # ----------------------------------------------------------------------------- FLOPs
    def _expert_rows_per_token(self) -> float:
        """Expert rows computed per token of a microbatch (capacity pads to E·C slots)."""
        lay = self.layout
        if lay is not None and lay.mode == "capacity":
            return self.experts * lay.capacity / lay.seq
        return self.k

    def _forward_matmul_params(self) -> float:
        """Weights a token's forward pass multiplies by, in the layers (no head)."""
        d, hd, L = self.d, self.hd, self.layers
        attention = L * d * hd * (2 * self.h + 2 * self.kv)
        dense = (L - self.moe_layers) * 3 * d * self.mlp
        experts = self.moe_layers * 3 * d * self.f * (self._expert_rows_per_token() + self.shared)
        router = self.moe_layers * d * self.experts
        return attention + dense + experts + router

    def flops_per_token_extra(self, remat: str, seq_len: int, microbatches: int = 1) -> float:
        """FLOPs per token beyond the model FLOPs (6 · active weights + half the attention):
        the masked half of causal attention, capacity padding (E·C slots computed instead of
        N·k), remat's recomputed forward pass and the statistics pass with microbatches."""
        d, L = self.d, self.layers
        padding = 6 * self.moe_layers * 3 * d * self.f * (self._expert_rows_per_token() - self.k)
        forward = 2 * self._forward_matmul_params() + 4 * L * self.h * self.hd * seq_len
        masked = 6 * L * self.h * self.hd * seq_len   # causal attention's computed, uncounted half
        extra = padding + masked
        if remat == "full":
            extra += forward
        elif remat == "save_dots":
            # The grouped matmuls (ragged_dot) and the capacity einsums (a batch dimension: the
            # expert) are not saveable dots: the experts' forward pass is recomputed too.
            extra += (4 * L * self.h * self.hd * seq_len
                      + 2 * self.moe_layers * 3 * d * self.f * self._expert_rows_per_token())
        if microbatches > 1 and self.stats_pass:
            extra += forward
        return extra
