"""Step time of a plan: compute at an achievable fraction of peak, the memory-bound floors, and
only the communication the schedule cannot hide (docs/planner.md, "Step time").

    step = max(compute, overlappable ICI traffic) + exposed ICI traffic + DCN traffic

compute      per device: every layer run (layer x microbatch, pipeline bubble slots included)
             takes the longer of its matmul FLOPs at MXU_EFFICIENCY x peak and reading its
             gathered weights from HBM three times (forward, input gradient, weight gradient;
             a fourth time under full remat); the embedding / head likewise; remat's
             recomputation counts as FLOPs; the optimizer update reads parameters, gradients
             and both Adam moments and writes three of them back (float32, HBM-bound).
overlappable the weights' traffic: FSDP all-gathers (prefetched a layer ahead), gradient
             reduce-scatters and the all-reduces of gradients over the axes that replicate a
             weight. Hidden behind compute while there is compute to hide it behind.
exposed      the activations' traffic on ICI (tensor-parallel sums, the embedding's rows,
             expert exchanges, pipeline hand-offs): on the critical path; the compiler's async
             collective fusion hides part of it, EXPOSED_ACTIVATION_TRAFFIC is the rest. Every
             collective also pays its launch latency.
DCN          between slices / nodes: everything on it counts in full, at DCN_EFFICIENCY of the
             data-sheet bandwidth (the gradient all-reduce across slices ends the step, after the
             last layer's backward pass, with nothing left to hide it).

The three constants are fitted on one table only: MaxText's published v5p measurements
(experiments/maxtext.py V5P, 16 rows, 32B-1024B on 1-2 x v5p-128 ... v5p-4096); the v5e table
(24 rows) is held out. tests/test_planner_time.py checks both, docs/planner.md has the rows.

Not priced: the attention score arrays' HBM traffic (paxlike's attention materialises them; the
published measurements ran a flash kernel that keeps them on chip, so the model counts attention
as MXU FLOPs like every matmul), and host-side step overheads.
"""

from __future__ import annotations

import dataclasses
import math

# Fitted on the v5p table (module docstring); the v5e table is held out.
MXU_EFFICIENCY = 0.76              # achievable fraction of the bf16 peak on large matmuls
EXPOSED_ACTIVATION_TRAFFIC = 0.05  # fraction of activation collectives on the critical path
DCN_EFFICIENCY = 0.3               # achieved fraction of the data-sheet DCN bandwidth
OPTIMIZER_BYTES_PER_PARAM = 28     # Adam in float32: read p, g, m, v; write p, m, v
WEIGHT_READS = {"none": 3, "save_dots": 3, "full": 4}   # per layer run: fwd, dX, dW, (recompute)


@dataclasses.dataclass(frozen=True)
class StepTime:
    seconds: float
    parts: dict[str, float]   # compute, hidden_ici (the part not hidden), exposed_ici, dcn
    binding: str              # "compute", "ICI (<axis> traffic)" or "DCN (<axis> traffic)"
    reason: str               # one line: where the time goes


def constants() -> tuple[float, float, float]:
    """(MXU_EFFICIENCY, EXPOSED_ACTIVATION_TRAFFIC, DCN_EFFICIENCY): the fitted constants."""
    return MXU_EFFICIENCY, EXPOSED_ACTIVATION_TRAFFIC, DCN_EFFICIENCY


def roofline(flops: float, hbm_bytes: float, peak: float, hbm_bandwidth: float,
             mxu_efficiency: float) -> float:
    """Seconds of one kernel: its FLOPs at `mxu_efficiency` x peak or its HBM bytes, the
    longer."""
    return max(flops / (mxu_efficiency * peak), hbm_bytes / hbm_bandwidth)


def predict(*, layer_flops: float, layer_runs: float, layer_weight_bytes: float,
            head_flops: float, head_weight_bytes: float, head_runs: float, remat: str,
            local_param_bytes: float, peak: float, hbm_bandwidth: float,
            comm_s: dict[str, float], overlappable_s: dict[str, float],
            latency_s: dict[str, float], fitted: tuple[float, float, float] | None = None
            ) -> StepTime:
    """One device's step time.

    layer_flops / head_flops: FLOPs one device computes in the layers (remat included; a
    pipeline's bubble slots included) and in the embedding / head; *_runs: how many times each
    runs per step (layers x microbatches, or iterations x stage layers); *_weight_bytes: the
    weights one run reads (gathered, compute dtype); local_param_bytes: float32 parameter bytes
    on the device; comm_s: seconds per "axis/link" at the data-sheet bandwidth; overlappable_s:
    the part of those seconds that is weight traffic; latency_s: per-link launch latency of every
    collective (counted in full); fitted: the three constants (default `constants()`; `fit`
    tries others)."""
    mxu, exposed_share, dcn_share = fitted or constants()
    reads = WEIGHT_READS[remat]
    compute = (layer_runs * roofline(layer_flops / max(layer_runs, 1), reads * layer_weight_bytes,
                                     peak, hbm_bandwidth, mxu)
               + head_runs * roofline(head_flops / max(head_runs, 1), 3 * head_weight_bytes,
                                      peak, hbm_bandwidth, mxu)
               + local_param_bytes / 4 * OPTIMIZER_BYTES_PER_PARAM / hbm_bandwidth)
    activations = {k: s - overlappable_s.get(k, 0.0) for k, s in comm_s.items()}
    hidden = sum(s for k, s in overlappable_s.items() if k.endswith("/ici"))
    exposed = (exposed_share
               * sum(s for k, s in activations.items() if k.endswith("/ici"))
               + latency_s.get("ici", 0.0))
    dcn = (sum(s for k, s in comm_s.items() if k.endswith("/dcn")) / dcn_share
           + latency_s.get("dcn", 0.0))
    seconds = max(compute, hidden) + exposed + dcn
    parts = {"compute": compute, "hidden_ici": max(0.0, hidden - compute), "exposed_ici": exposed,
             "dcn": dcn}

    def busiest(link, seconds_by_key):
        keys = [k for k, s in seconds_by_key.items() if k.endswith(link) and s > 0]
        return max(keys, key=seconds_by_key.get).split("/")[0] if keys else "no"

    if hidden > compute:
        binding = f"ICI ({busiest('/ici', overlappable_s)} traffic)"
    elif dcn > compute:
        binding = f"DCN ({busiest('/dcn', comm_s)} traffic)"
    else:
        binding = "compute"
    words = [f"compute {compute:.3g} s"]
    if parts["hidden_ici"]:
        words.append(f"+ {parts['hidden_ici']:.3g} s of {busiest('/ici', overlappable_s)} weight "
                     f"traffic compute cannot hide")
    if exposed > 1e-3 * seconds:
        words.append(f"+ {exposed:.3g} s exposed {busiest('/ici', activations)} traffic")
    if dcn > 1e-3 * seconds:
        words.append(f"+ {dcn:.3g} s DCN ({busiest('/dcn', comm_s)})")
    return StepTime(seconds, parts, binding, " ".join(words))


def fit(samples) -> tuple[float, float, tuple[float, float, float]]:
    """Grid search of (MXU_EFFICIENCY, EXPOSED_ACTIVATION_TRAFFIC, DCN_EFFICIENCY) minimising the
    largest relative error of predicted MFU over `samples` (then, among the constants that reach
    it, the root-mean-square error): (predict's keyword arguments for a plan, i.e.
    `Cost.step_inputs`, the measured step seconds). Returns (that RMS error, the largest error,
    the constants)."""
    best = None
    for eta in [x / 100 for x in range(60, 101)]:
        for exposed in [x / 20 for x in range(21)]:
            for dcn in [x / 10 for x in range(1, 11)]:
                trial = (eta, exposed, dcn)
                # MFU is inversely proportional to step time: compare measured / predicted
                errors = [measured / predict(**inputs, fitted=trial).seconds - 1
                          for inputs, measured in samples]
                rms = math.sqrt(sum(e * e for e in errors) / len(errors))
                worst = max(map(abs, errors))
                # the bound the tests hold a table to is its largest error: minimise that (to
                # 0.1%), then the RMS error among the constants that reach it
                if best is None or (round(worst, 3), rms) < (round(best[1], 3), best[0]):
                    best = (rms, worst, trial)
    return best
