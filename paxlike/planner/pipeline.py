"""Pipeline parallelism (paxlike/pipeline.py) in the cost model: the circular GPipe schedule's
bubble, the activations of every microbatch in flight, its collectives and its per-step weight
relayout (docs/planner.md, "Pipeline parallelism", has the figures).

With S = mesh.pipeline stages, M microbatches (a multiple of S), R circular repeats and L stacked
layer blocks, each stage holds K = L / (R·S) layers per repeat, and the schedule runs
I = M·R + S − 1 iterations; in each one every stage runs its K layers on one microbatch (bubble
slots compute on zeros: masked, not skipped). What changes against gradient accumulation over M
microbatches, per device (`cost.estimate` applies it):

Parameters, gradients, optimizer state: nothing here. The stacked weights' 'layers' dimension is
split over `pipeline` by every preset's rules, so the exact per-parameter accounting
(`sharding.logical_to_spec`) already divides them by S; the embedding and the head stay
replicated over `pipeline`.

Compute (`steptime`): a stage computes I·K layer-microbatches for M·R·K useful ones, so the layers' FLOPs take
1 / (1 − bubble) longer, bubble = (S − 1) / (R·M + S − 1); the embedding and the head run once per
step on the local rows B/W (the batch is split over `pipeline` too outside the stages), so their
FLOPs are not stretched.

Collectives, read off the XLA:CPU HLO of tests/test_planner_pipeline.py's fitted cases and the v5p
HLO of the AOT case:
  stage hand-off  a collective-permute over `pipeline` of one microbatch's activation
                  [b, t, d] per iteration, forward and again backward (2·I). Across slices
                  (mesh.dcn.pipeline > 1) it is a DCN transfer (the megascale ONE_TO_ONE send
                  that `hlo.py` counts), and the busiest device sends all of it over DCN.
  buffer          the embedded batch (rows B/W) reaches every stage's buffer (rows pooled per
                  group of devices that differ only in their pipeline index, `split_rows`): an
                  all-gather over `pipeline` of the buffer [M·b, t, d]; backward, its cotangent
                  is summed over the stages (an all-reduce).
  return          stage 0's buffer back to the rows split over `pipeline` for the head
                  (`join_rows`, constrained): an all-to-all over `pipeline` of the buffer
                  forward and of its cotangent backward, plus one microbatch backward.
  FSDP weights    per_iteration: each iteration gathers the K layers it runs (forward, and again
                  in the backward pass) and reduces their gradients, i.e. I / R times a stage's
                  weights per step instead of M times; XLA:CPU gathers the MLP's input weights
                  (gate, up) once more in the backward pass under remat. per_step: once.
                  The head and the embedding lookup run once per step on the local rows B/W;
                  a tied table is gathered whole over the FSDP axes for the head like an untied
                  head (`cost.estimate`; v5p HLO of the 125m AOT case).
  relayout        R > 1: [L, ...] -> [S, R, K, ...] moves the weights between pipeline devices:
                  an all-to-all over `pipeline` of the local layer weights (float32) forward and
                  of their gradients backward.
  embedding       TPU: the embedding table's float32 gradient is all-reduced over `pipeline`
                  (each stage scatters a partial cotangent).

Memory: GPipe keeps every iteration's residuals, so the saved activations are I·K layers of one
microbatch's per-layer residuals (`residuals.saved_bytes`, traced, split by the layer scan; save_dots
saves as full, `layer_remat`: the stages are vmapped, so every matmul has a batch dimension);
the head's and the loss's residuals for the local rows B/W count in the loss phase on XLA:CPU
(freed by the head's backward pass, before the stages' one) and beside the saved activations on
TPU; the working set is the larger of one layer's backward on a microbatch and the loss on the
local rows B/W; plus the microbatch buffer and the stage inputs' cotangents (BUFFER_ARRAYS
arrays of [M·b, t, d]); with R > 1 the relayout's [S, R, K] copy of the local layer weights
(float32; their gradients accumulate in that layout: the gradient term); with per_step the
stage weights gathered whole over the FSDP axes in float32, with their gradient. No
microbatch-gradient partner (`cost.estimate`): the backward scan adds each iteration's gradients
into the stage's in place. Read off the XLA:CPU buffer assignments of the fitted and held-out
cases (peak in the stages' backward pass) after the stages began taking each layer's weights
inside its rematerialised body, so no per-iteration copy of them is kept; with remat "none" the
backward pass keeps each iteration's layer weights (counted). v5p (125m AOT case): the stage
weights' gradient in the [S, R, K] layout (float32) beside the accumulator (read off the
buffer assignment before that change; its peak is now in the head's backward pass).
"""

from __future__ import annotations

import dataclasses
import math

from paxlike import pipeline as schedule

AXIS = "pipeline"
# Arrays of the local batch's activations [M·b, t, d] (compute dtype) live beyond the saved
# residuals and the working set: the microbatch buffer (every stage keeps one) and its cotangent.
BUFFER_ARRAYS = 2
# Stage buffers [M·b, t, d] the return of stage 0's outputs to the head's row layout moves per
# step with all-to-alls over `pipeline`, forward and backward together (XLA:CPU HLO).
RETURN_BUFFERS = 2


@dataclasses.dataclass(frozen=True)
class Layout:
    stages: int           # S
    microbatches: int     # M
    repeats: int          # R
    per_stage: int        # K: layers a stage runs per iteration
    layers: int           # L: stacked layer blocks
    fsdp_gather: str      # per_iteration | per_step

    @property
    def iterations(self) -> int:
        return self.microbatches * self.repeats + self.stages - 1

    @property
    def bubble(self) -> float:
        return schedule.bubble_fraction(self.stages, self.microbatches, self.repeats)

    @property
    def weight_uses(self) -> float:
        """Times a stage's local layer weights are used (gathered, reduced) per step, per pass,
        in units of the whole local stack (R·K layers)."""
        if self.fsdp_gather == "per_step":
            return 1.0
        return self.iterations / self.repeats

    def gathers(self, backend: str, remat: str, names) -> int:
        """All-gathers of one stacked weight per use (`weight_uses`): forward and backward per
        iteration, plus XLA:CPU's second one of the MLP's input weights (last logical axis
        'mlp': gate, up) under remat; per_step: once, before the schedule."""
        if self.fsdp_gather == "per_step":
            return 1
        return 2 + (backend == "cpu" and remat != "none" and names[-1] == "mlp")

    @property
    def layer_runs(self) -> int:
        """Layer-microbatches one stage computes per step (bubble slots included)."""
        return self.iterations * self.per_stage


def layout(plan, sizes: dict[str, int], num_layers: int) -> Layout | None:
    """The schedule of a plan (None without a pipeline axis); UserError when it is invalid, in
    the trainer's own words (`paxlike.pipeline.checked_spec`)."""
    spec = schedule.checked_spec(sizes.get(AXIS, 1), plan.microbatches, plan.pipeline_repeats,
                                 num_layers, plan.pipeline_fsdp_gather)
    if spec is None:
        return None
    return Layout(spec.stages, spec.microbatches, spec.repeats,
                  num_layers // (spec.stages * spec.repeats), num_layers, spec.fsdp_gather)


def collectives(send, pipe: Layout, b: int, t: int, d: int, dt: int,
                local_layer_bytes: float) -> None:
    """The pipeline's own collectives (module docstring). b: sequences per microbatch per device
    inside a stage; local_layer_bytes: this device's float32 shard of the stacked layers."""
    micro = b * t * d * dt
    buffer = micro * pipe.microbatches      # a stage's buffer: the microbatches it holds
    send("collective-permute", [AXIS], micro, 2 * pipe.iterations)
    # The embedded batch (rows split over `pipeline` too) into every stage's buffer (rows split
    # only inside a stage, pooled by `split_rows` so no other axis moves): an all-gather over
    # `pipeline`; backward, the buffer's cotangent is summed over the stages (an all-reduce).
    send("all-gather", [AXIS], buffer)
    send("all-reduce", [AXIS], buffer)
    # Stage 0's buffer back to the rows split over `pipeline` for the head (`join_rows`, then
    # constrained): an all-to-all over `pipeline` of the buffer forward, and of its cotangent
    # backward, plus one microbatch's backward (from the transpose of the buffer write-back).
    # XLA:CPU HLO: 2 buffers + 1 microbatch in the fsdp 4 and the held-out case and in every
    # pipeline-only row of benchmarks/pipeline.py (M up to 16); the data 2 x fsdp 2 case has no
    # separate microbatch piece (over by that microbatch there).
    send("all-to-all", [AXIS], buffer, RETURN_BUFFERS)
    send("all-to-all", [AXIS], micro)
    if pipe.repeats > 1:
        send("all-to-all", [AXIS], local_layer_bytes, 2)


def memory(pipe: Layout, layer_saved: float, rest_saved: float, b: int, t: int, d: int, dt: int,
           local_layer_bytes: float, fsdp_ways: int, backend: str, remat: str
           ) -> dict[str, float]:
    """Per-device bytes the schedule adds or changes (module docstring). layer_saved: one
    layer's saved residuals for one microbatch; rest_saved: the head's and loss's for the local
    rows B/W, returned apart as head_saved (`cost.estimate` counts it in the loss phase on
    XLA:CPU, beside the saved activations on TPU)."""
    out = {"activations": pipe.layer_runs * layer_saved, "head_saved": rest_saved,
           "pipeline_buffers": BUFFER_ARRAYS * pipe.microbatches * b * t * d * dt,
           # the stage weights' gradient in the [S, R, K] layout beside the accumulator (read off
           # the v5p buffer assignment; not counted on CPU, whose cases are within their bounds
           # without it)
           "stage_grads": local_layer_bytes if backend != "cpu" else 0.0}
    if remat == "none":
        # Without remat the backward pass keeps every iteration's layer weights (taken from the
        # stage's weights inside the layer body; with remat the body takes them again).
        out["activations"] += pipe.layer_runs * local_layer_bytes * pipe.stages / pipe.layers
    if pipe.repeats > 1:
        # the [S, R, K] copy of the local layer weights (float32); their gradients accumulate in
        # that layout and are the gradient term (XLA:CPU buffer assignments of the R = 2 cases)
        out["relayout"] = local_layer_bytes
    if pipe.fsdp_gather == "per_step" and fsdp_ways > 1:
        out["stage_weights"] = 2 * local_layer_bytes * fsdp_ways
    return out


def layer_remat(remat: str) -> str:
    """The policy a stage's layers effectively run under: the stage function is vmapped over
    the stage dimension, so every matmul in a layer has a batch dimension and save_dots
    (`dots_with_no_batch_dims_saveable`) saves none of them: as full (XLA:CPU buffer assignment
    of the held-out case: only each layer's input is saved per iteration)."""
    return "full" if remat == "save_dots" else remat


def options(num_layers: int, per_granule: int, granules: int) -> list[tuple[int, int]]:
    """(stages, DCN part) the search tries: none; all slices as stages (the pipeline alone
    crosses DCN); 2 or 4 stages inside a slice. Each divides the layer blocks. (A one-layer stage
    is allowed: what it costs, a hand-off, gathers and a bubble slot per layer, is priced, and R = 2
    already gives K = 1 stages, e.g. the fitted 4-layer S = 2, R = 2 case; no search-side minimum
    is needed.)"""
    out = [(1, 1)]
    fits = lambda s: num_layers % s == 0
    if granules > 1 and fits(granules):
        out.append((granules, granules))
    for s in (2, 4):
        if per_granule % s == 0 and per_granule > s and fits(s):
            out.append((s, 1))
    return out


def repeats(num_layers: int, stages: int) -> list[int]:
    """Circular repeats the search tries: 1, and 2 where it divides the layers per stage."""
    if stages == 1:
        return [1]
    return [r for r in (1, 2) if num_layers % (stages * r) == 0
            and num_layers // (stages * r) >= 1]


def microbatch_options(stages: int, candidates: list[int]) -> list[int]:
    """Microbatch counts of a pipeline plan: multiples of the stages (every stage needs one)."""
    return [m for m in candidates if m % stages == 0] if stages > 1 else candidates


def describe(plan) -> str:
    if dict(plan.mesh).get(AXIS, 1) == 1:
        return ""
    gather = "" if plan.pipeline_fsdp_gather == "per_iteration" else ", gather per step"
    return f" (R={plan.pipeline_repeats}{gather})"


def num_layer_blocks(infos) -> int:
    """L: the stacked layer blocks (the 'layers' dimension of the stacked weights; 0: none)."""
    for p in infos:
        if "layers" in p.names:
            return p.shape[p.names.index("layers")]
    return 0


def local_bytes(infos, ways_of, scanned: bool) -> float:
    """Float32 bytes of this device's shard of the stacked (or the other) weights."""
    total = 0.0
    for p in infos:
        if ("layers" in p.names) == scanned:
            total += 4 * math.prod(d // w for d, w in zip(p.shape, ways_of(p)))
    return total
