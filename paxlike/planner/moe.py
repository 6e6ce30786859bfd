"""The mixture-of-experts Transformer (models/moe.py) in the cost model: its dispatch layout on a
mesh, the collectives of expert parallelism, the routed arrays it keeps, and its FLOPs.

Everything the dense Transformer has (attention, the dense layers of `moe_every > 1`, the head,
the embedding) is priced by `cost.estimate` as for the dense family, with two changes there:
axes that shard a weight's `experts` dimension are not FSDP axes (expert weights are never
gathered over them: the tokens travel instead), and the router weight is used in float32.
Parameters and optimizer state of the experts come from the model's own shapes and logical names
like every other weight. What is added here, per MoE layer and microbatch (per device):

Dispatch (how models/moe.py routes, `MoEActivations.configure`):
  ep        dropless with `experts` sharded over mesh axes ("EP group", P devices): the experts'
            shard_map (kernels/moe/expert_parallel.py). n local tokens (b·t, divided by the EP
            axes the tokens are not split over: `fold_tensor`'s `tensor`), r = n·k rows sent,
            R = r·P rows received: the worst case, every buffer past the exchange is that size.
  capacity  `capacity_factor > 0`: the GShard [E, C, d] buffer, experts sharded over the same
            axes by a sharding constraint, C = ceil(N·k/E·factor) for the N tokens of the global
            microbatch. GSPMD builds it from the tokens all-gathered whole (no all-to-all).
  local     one device, or tokens not sharded: the single-device grouped matmuls.
Dropless experts that are not sharded while the tokens are (the `fsdp` / `data` presets, or
expert = 1) are not modelled: GSPMD partitions the global sort of every token's assignment by
replicating it (all-reduces of the [N·k, f] rows on 8 CPU devices); `estimate` rejects the plan.

Collectives (`collectives`, the volumes `paxlike.planner.hlo` reads; read off the XLA:CPU HLO of
the cases in tests/test_planner_moe.py):
  ep, forward   all-gather of the [P, E] int32 expert counts over the EP group; the dispatch and
                the return exchange: CPU / GPU (`padded`) an all-to-all of a [P, r, d] buffer
                each (plus a [P] int32 all-to-all of landing offsets each), TPU (`ragged`) a
                ragged all-to-all moving r rows on average each; with `mlp` split inside the
                experts a psum of the [n, d] output over those axes; with EP axes the tokens are
                not split over, an all-gather of the [n·that, d] output over them.
  ep, backward  the two exchanges transposed (same volumes), the output psum transposed, the
                all-gather transposed (a reduce-scatter), and a psum of the input's cotangent
                [n, d] (+ the [n, k] float32 combine weights') over every mesh axis the tokens
                are replicated over inside the shard_map.
  capacity      forward: all-gather of the microbatch's tokens [N, d] and an all-reduce of the
                combined rows [N, k, d] (each device holds its experts' rows); backward: an
                all-gather of the rows' cotangent [N, k, d] and an all-reduce of the tokens'
                [N, d]; all over the axes that shard the tokens.
  router        forward: an all-gather of the router probabilities [B, T, E] float32 of the
                global microbatch over the batch axes (GSPMD gathers them for the routing
                weights' take_along_axis).
  Under remat (`full` and `save_dots`: the exchanges are not dots) the forward ones run again in
  the backward pass. With microbatches, the model's global-batch statistics (expert counts, for
  the load-balancing loss) take one more forward pass over every microbatch first
  (paxlike/step.py): every forward collective of the layers runs once more (`stats_pass`).
  XLA:CPU runs the exchanges in float32 whatever the compute dtype (seen in a bfloat16 compile);
  other backends in the compute dtype.

Memory (XLA:CPU counts, read from the buffer assignment at the peak, as workingset.py): the
routed arrays are not in the traced residuals (the planner traces the model on one device, where
they are the single-device path's flattened [N·k, ...] arrays; `cost.saved_bytes` drops them) and
are counted here from the layout, per MoE layer: without remat 6 float32 [R, f] (gate, up and
their SiLU / product intermediates), 2 float32 [R, d], 3 + 6 byte-sized masks of [R, f] / [R, d]
(the padding selects) and 6 int32 [R] index arrays are saved; with remat nothing routed is saved.
At the peak, the backward pass of the last MoE layer, live beyond the saved activations:
2 (no remat) or 4 (remat) float32 [R, f] and 6 [R, d]-sized arrays (the received rows, their
cotangents, the exchange buffers). Capacity: 6 float32 [E_l·C, f] and 1 [E_l·C, d] saved without
remat; at its peak the all-gathered rows [N, k, d] (1 without remat, 2 with, plus 2 [N, d]).
"""

from __future__ import annotations

import dataclasses
import math

from paxlike.errors import UserError
from paxlike.planner.workingset import STREAM_ARRAYS, TransformerActivations

# Routed arrays of one MoE layer (module docstring), per remat policy: saved for the backward
# pass (f32 [R, f], f32 [R, d], byte masks [R, f], [R, d], int32 [R]) and live at the layer's
# backward peak beyond them (f32 [R, f], 4-byte [R, d]).
EP_SAVED = {"none": (6, 2, 3, 6, 6), "save_dots": (0, 0, 0, 0, 0), "full": (0, 0, 0, 0, 0)}
EP_WORKING = {"none": (5, 5), "save_dots": (6, 5), "full": (6, 5)}
CAPACITY_SAVED = {"none": (6, 1), "save_dots": (0, 0), "full": (0, 0)}


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


class MoEActivations(TransformerActivations):
    """The Transformer's description plus the experts (module docstring)."""

    routed_residuals = True          # cost.saved_bytes drops the traced flattened routed arrays
    float32_params = ("router/w",)   # used in float32 (x.astype(f32) @ w): gathered as such
    stats_pass = True                # global-batch statistics: one more forward per microbatch

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.experts, self.k = m.num_experts, m.experts_per_token
        self.f = m.expert_mlp_dim or m.mlp_dim
        self.moe_every, self.moe_layers = m.moe_every, m.num_layers // m.moe_every
        self.shared = m.num_shared_experts
        self.capacity_factor = float(m.capacity_factor)
        self.reference = m.get("moe_dispatch", "auto") == "reference"
        self.layout: Layout | None = None

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
        self.layout = Layout(mode, ep_axes, token_axes, replicated, reduce_axes, grad_axes, ep,
                             n, tokens_full, global_tokens, experts_local, f_local, rows,
                             capacity)
        return self.layout

    # --------------------------------------------------------------------------- traffic
    def collectives(self, send, mb: int, remat: str, backend: str, batch_axes) -> None:
        """Records the MoE layers' collectives of one step with `send(kind, axes, bytes, times)`
        (module docstring); `batch_axes`: the mesh axes (size > 1) the batch is split over."""
        lay, d, k = self.layout, self.d, self.k
        cx = 4 if backend == "cpu" else self.dt       # XLA:CPU exchanges in float32
        forward = mb * self.moe_layers * (1 + (remat != "none") + (mb > 1 and self.stats_pass))
        backward = mb * self.moe_layers
        # The router's probabilities, gathered whole over the batch axes (forward).
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

    def tensor_sums_per_layer(self, dense: float, backend: str, remat: str) -> float:
        """Tensor-parallel all-reduces of the residual stream per layer, averaged over the
        layers: a MoE layer keeps the attention's (forward: its output; backward: q, k, v
        separately on CPU, once on TPU; remat `full` recomputes the forward one) and sums its
        experts' output in `collectives` instead of the dense MLP's."""
        moe = (1 + (3 if backend == "cpu" else 1)) + (remat == "full")
        return ((self.layers - self.moe_layers) * dense + self.moe_layers * moe) / self.layers

    # ---------------------------------------------------------------------------- memory
    def routed_saved(self, remat: str) -> float:
        """Per-device bytes of the routed arrays all MoE layers save for the backward pass."""
        lay, d = self.layout, self.d
        R, f = lay.rows, lay.f_local
        if lay.mode == "capacity":
            a, c = CAPACITY_SAVED[remat]
            return self.moe_layers * R * (a * f * 4 + c * d * 4)
        a, c, mask_f, mask_d, ints = EP_SAVED[remat]
        return self.moe_layers * R * (a * f * 4 + c * d * 4 + mask_f * f + mask_d * d + ints * 4)

    def working_set(self, remat: str, b: int, t: int, tp: int, vocab_ways: int
                    ) -> dict[str, float]:
        """The dense candidates (a dense layer's backward only when there are dense layers) and
        the backward pass of the last MoE layer (module docstring)."""
        phases = super().working_set(remat, b, t, tp, vocab_ways)
        if self.moe_every == 1:
            phases.pop("layer_backward")
        lay, d = self.layout, self.d
        u = self.units(b, t, tp, vocab_ways)
        common = u["scores"] + STREAM_ARRAYS * u["stream"] + u["embed_grad"]
        weights = (2 * self.dt + 4) * 3 * lay.experts_local * d * lay.f_local
        if lay.mode == "capacity":
            n = lay.tokens_full * lay.ep          # the EP group's tokens, gathered
            rows = n * self.k * d * 4
            moe = rows + lay.rows * d * 4 if remat == "none" else 2 * rows + 2 * n * d * 4
        else:
            a, c = EP_WORKING[remat]
            moe = lay.rows * (a * lay.f_local * 4 + c * d * 4)
        phases["moe_backward"] = moe + common + weights
        return phases

    # ----------------------------------------------------------------------------- FLOPs
    def _expert_rows_per_token(self) -> float:
        """Expert rows computed per token of a microbatch (capacity pads to E·C slots)."""
        lay = self.layout
        if lay is not None and lay.mode == "capacity":
            return self.experts * lay.capacity / lay.global_tokens
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
        """FLOPs per token beyond the model FLOPs (6 · active weights + attention): capacity
        padding (E·C slots computed instead of N·k), remat's recomputed forward pass and the
        statistics pass with microbatches."""
        d, L = self.d, self.layers
        padding = 6 * self.moe_layers * 3 * d * self.f * (self._expert_rows_per_token() - self.k)
        forward = 2 * self._forward_matmul_params() + 4 * L * self.h * self.hd * seq_len
        extra = padding
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
