"""Pipeline parallelism on emulated CPU devices: the bubble, measured in the compiled program, and
compiled memory per device against the number of microbatches.

    .venv/bin/python benchmarks/pipeline.py                  # both tables, 4-5.5 min on 2 cores
    .venv/bin/python benchmarks/pipeline.py --tables=bubble  # one of them
    .venv/bin/python benchmarks/pipeline.py --tables=memory  # the other, 1-3 min

Everything here is read from compiled train steps (`paxlike.trainer.Trainer(cfg, mesh).compile()`:
the real step with its shardings, optimizer and donation); nothing is run. The process has 8
emulated CPU devices (`jax_num_cpu_devices`); a mesh of S devices uses the first S.

**Bubble.** Wall time cannot show it here: the emulated devices share the machine's cores, so a
step's time is the sum of every device's work, not the slowest device's, and pipeline overlap is
invisible. What the compiled program does show is the work each device is given. Bubble slots are
not skipped: every device runs its stage at every iteration, on zeros where it has no work item
(paxlike/pipeline.py), so the bubble is work that a device does and that nobody needed. The
benchmark counts the matmul FLOPs of one device's program, read from the optimized HLO: every
`dot` (inside fusions too) costs 2 · |output| · |contracted dims| and is multiplied by the number
of times it runs (loops by their trip counts, which XLA:CPU states). XLA's own `cost_analysis()`
counts a loop body once, whatever its trip count, so it cannot be used.

To take out the work outside the layer stack (embedding, head, loss, optimizer), each (S, M, R)
is compiled twice, with K = 1 and K = 2 layers per stage and repeat (L = R·S·K layers): the
difference is what R·S more layers cost one pipeline device. The useful part of that is 1/S of
what the same R·S layers cost the unpipelined step (one device, gradient accumulation over the
same M microbatches, compiled with 1 and 2 layers and M = 1; its per-layer cost is per
microbatch, so M microbatches cost M times it: that is the scan's trip count). So

    measured bubble = 1 − (R·S·M · c / S) / Δ_pipeline,     c = Δ_unpipelined per microbatch,

and Δ_pipeline / c is the number of stage-iterations one device computes per step, to set against
the schedule's M·R + S − 1. Only matmuls are counted (elementwise work is not); both steps run the
same layers on microbatches of the same size, so the ratio is theirs.

**Memory.** `compiled.memory_analysis()` per device: arguments (state, batch) and temporaries
(the step's working memory: activations kept for the backward pass, gradients, buffers), for the
pipeline (mesh pipeline=S) and for gradient accumulation over the same microbatches on the same S
devices (mesh fsdp=S). The microbatch size is fixed, so the global batch grows with M; one more
row per schedule (S=4, M=16) rematerialises every layer (model.remat=full). Traffic is the
compiled program's collectives (`paxlike.planner.hlo.collectives`): bytes each device sends per
step, in all and by kind (permute: the stage-to-stage activations; all-to-all: the R > 1 weight
regrouping and its gradient, and stage 0's outputs back to the rows split over `pipeline` for
the head; all-gather / all-reduce: FSDP's weights and gradients, the embedded batch gathered
into the stage buffers over `pipeline` and its cotangent summed, and the embedding and head
gradients summed over `pipeline`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/gla.py's machine()

# Only the compiled programs are read, never run: skip LLVM's optimisation of the CPU code (a third
# of a compile). HLO, shardings and buffer assignment are the same (as in tests/conftest.py).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

DEVICES = 8
# The bubble's model: experiments/transformer.py:tiny shrunk (as the tests shrink it), layers
# set per run.
BUBBLE_MODEL = dict(d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, vocab_size=256)
BUBBLE_ROWS, BUBBLE_SEQ = 2, 32          # rows per microbatch, sequence length
# The memory table's model: tiny's width (d 128, mlp 512, vocab 512) with 8 layers.
MEMORY_MODEL = dict(d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=512, vocab_size=512,
                    num_layers=8)
MEMORY_ROWS, MEMORY_SEQ = 4, 128


def machine() -> str:
    """benchmarks/gla.py's machine line, with the device count."""
    import jax
    from gla import machine as host
    return f"{host()} | {jax.device_count()} emulated devices"


def _dims(typ: str) -> list[int]:
    m = re.search(r"\[([0-9,]*)\]", typ)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(hlo_text: str) -> float:
    """Matmul FLOPs one device executes per step: Σ over `dot`s of 2·|out|·|contracted| × runs."""
    from paxlike.planner import hlo
    comps, runs, _ = hlo.computation_runs(hlo_text)
    total = 0.0
    for comp, instrs in comps.items():
        types = {name: typ for name, typ, op, rest in instrs}
        for name, typ, op, rest in instrs:
            if op != "dot" or not runs[comp]:
                continue
            lhs = re.match(r"\s*%?([\w.\-]+)", rest).group(1)
            contracted = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest).group(1)
            lhs_dims = _dims(types[lhs])
            k = math.prod(lhs_dims[int(i)] for i in contracted.split(",") if i)
            total += runs[comp] * 2.0 * math.prod(_dims(typ)) * k
    return total


def _config(model: dict, *, layers: int, rows: int, seq: int, microbatches: int, repeats: int,
            pipeline: int, fsdp: int):
    from paxlike.experiments import transformer
    cfg = transformer.get_config("tiny")
    cfg.model.update(model)
    cfg.model.num_layers = layers
    cfg.update(batch_size=rows * microbatches, seq_len=seq, microbatches=microbatches,
               pipeline_repeats=repeats)
    for axis in cfg.mesh.keys():
        if axis not in ("dcn", "auto"):
            cfg.mesh[axis] = 1
    cfg.mesh.pipeline, cfg.mesh.fsdp = pipeline, fsdp
    return cfg


def _compile(cfg):
    import jax
    from paxlike.mesh import MESH_AXES, build_mesh
    from paxlike.trainer import Trainer
    n = cfg.mesh.pipeline * cfg.mesh.fsdp
    mesh = build_mesh({a: cfg.mesh[a] for a in MESH_AXES}, devices=jax.devices()[:n])
    return Trainer(cfg, mesh).compile()


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:,.1f}"


def bubble_table(progress) -> list[str]:
    from paxlike.pipeline import bubble_fraction
    common = dict(rows=BUBBLE_ROWS, seq=BUBBLE_SEQ)
    # The unpipelined step on one device: what one layer costs per microbatch.
    plain = [dot_flops(_compile(_config(BUBBLE_MODEL, layers=n, microbatches=1, repeats=1,
                                        pipeline=1, fsdp=1, **common)).as_text())
             for n in (1, 2)]
    per_layer = plain[1] - plain[0]
    progress(f"bubble: unpipelined, one layer per microbatch = {per_layer / 1e6:.3f} MFLOP")
    lines = [
        "| S | M | R | iterations M·R+S−1 | layers L (K=1 → 2) | Δ matmul MFLOP/device, pipelined |"
        " Δ useful (unpipelined / S) | stage-iterations/device, compiled | bubble, measured |"
        " bubble, formula |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for s in (2, 4):
        for r in (1, 2):
            for m in (s, 2 * s, 4 * s):
                flops = [dot_flops(_compile(_config(BUBBLE_MODEL, layers=r * s * k, microbatches=m,
                                                    repeats=r, pipeline=s, fsdp=1,
                                                    **common)).as_text())
                         for k in (1, 2)]
                delta = flops[1] - flops[0]
                useful = r * s * m * per_layer / s
                measured, formula = 1 - useful / delta, bubble_fraction(s, m, r)
                progress(f"bubble: S={s} M={m} R={r}: measured {measured:.4f}, formula "
                         f"{formula:.4f}")
                lines.append(
                    f"| {s} | {m} | {r} | {m * r + s - 1} | {r * s} → {2 * r * s} | "
                    f"{delta / 1e6:,.1f} | {useful / 1e6:,.1f} | {delta / per_layer:.2f} | "
                    f"{measured:.4f} | {formula:.4f} |")
    return lines


def memory_table(progress) -> list[str]:
    from paxlike.planner import hlo
    lines = [
        "| S | M | R | remat | batch (M × rows) | schedule | args MiB/dev | temp MiB/dev |"
        " temp vs M=S | args+temp MiB/dev | sent MiB/dev/step | of which |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    common = dict(layers=MEMORY_MODEL["num_layers"], rows=MEMORY_ROWS, seq=MEMORY_SEQ)
    for s in (2, 4):
        first = {}
        rows = [(s, 1, "none"), (2 * s, 1, "none"), (4 * s, 1, "none"), (2 * s, 2, "none")]
        if s == 4:
            rows.append((4 * s, 1, "full"))
        for m, r, remat in rows:
            runs = [("pipeline", dict(pipeline=s, fsdp=1, repeats=r))]
            if r == 1:
                runs.append(("accumulation", dict(pipeline=1, fsdp=s, repeats=1)))
            for name, mesh in runs:
                cfg = _config(dict(MEMORY_MODEL, remat=remat), microbatches=m, **mesh, **common)
                compiled = _compile(cfg)
                mem = compiled.memory_analysis()
                args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
                sent = {k: v["bytes"] for k, v in hlo.collectives(compiled.as_text(), s).items()
                        if v["bytes"]}
                first.setdefault(name, temp)
                label = (f"GPipe, pipeline={s}" if name == "pipeline" else
                         f"accumulation, fsdp={s}")
                progress(f"memory: S={s} M={m} R={r} remat={remat} {name}: args {_mib(args)} "
                         f"MiB, temp {_mib(temp)} MiB")
                kinds = ", ".join(f"{k.replace('collective-', '')} {_mib(v)}"
                                  for k, v in sorted(sent.items(), key=lambda kv: -kv[1]))
                lines.append(f"| {s} | {m} | {r if name == 'pipeline' else '-'} | {remat} | "
                             f"{m * MEMORY_ROWS} | {label} | {_mib(args)} | {_mib(temp)} | "
                             f"{temp / first[name]:.2f}x | {_mib(args + temp)} | "
                             f"{_mib(sum(sent.values()))} | {kinds} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="bubble,memory")
    args = parser.parse_args()
    wanted = {t.strip() for t in args.tables.split(",") if t.strip()}

    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", DEVICES)

    t0 = time.perf_counter()
    where = machine()

    def progress(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    out = [f"machine: {where}", ""]
    if "bubble" in wanted:
        b = BUBBLE_MODEL
        out += [f"Bubble: Transformer d_model={b['d_model']}, mlp {b['mlp_dim']}, "
                f"{b['num_heads']} heads, vocab {b['vocab_size']}, microbatches of {BUBBLE_ROWS} "
                f"x {BUBBLE_SEQ} tokens, float32; matmul FLOPs of the compiled train step per "
                f"device, K = 1 vs 2 layers per stage and repeat", ""]
        out += bubble_table(progress) + [""]
    if "memory" in wanted:
        mm = MEMORY_MODEL
        out += [f"Memory: Transformer d_model={mm['d_model']}, mlp {mm['mlp_dim']}, "
                f"{mm['num_layers']} layers, {mm['num_heads']} heads, vocab {mm['vocab_size']}, "
                f"microbatches of {MEMORY_ROWS} x {MEMORY_SEQ} tokens, float32, AdamW; "
                f"compiled train step on S devices, per device", ""]
        out += memory_table(progress) + [""]
    progress("done")
    print()
    print("\n".join(out))


if __name__ == "__main__":
    main()
