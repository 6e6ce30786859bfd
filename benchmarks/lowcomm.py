"""Training across weak links (paxlike/outer.py): loss and bytes of DiLoCo, streaming DiLoCo,
NoLoCo and CO2 against synchronous data parallelism, at tiny scale on the built-in corpus.

Every run trains the `tiny` Transformer from the same seed on the same batches (the global batch
split over `--replicas` data shards: R replicas, or plain data parallelism for `sync`) for the
same number of steps, and is evaluated on the same held-out batches at the end. Bytes are read
from the compiled programs (optimized HLO, paxlike/planner/hlo.py): what each device sends over
the `data` axis per step, averaged over H steps (the inner steps' programs and each outer step's
program), beside the planner's prediction for the same plan.

    python benchmarks/lowcomm.py [--steps=400] [--replicas=4] [--workdir=/tmp/lowcomm]
        [--only=sync,diloco-10,...] [--bytes_only]

`--co2_schedule=v5e:2x4 [--slices=2]` instead compiles CO2's outer-step program (125m, data 2 x
fsdp) for that TPU topology (libtpu, no TPU needed) and prints where, in the compiled schedule
of the step, the replicas' pseudo-gradient exchange starts and ends relative to the layer loops
of the forward and backward pass: what can overlap with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/gla.py's machine()

RUNS = {   # name: optimizer overrides
    "sync": {},
    "diloco-10": {"outer": "diloco", "outer_every": 10},
    "diloco-50": {"outer": "diloco", "outer_every": 50},
    "streaming-50x5": {"outer": "diloco", "outer_every": 50, "outer_fragments": 5},
    "noloco-10": {"outer": "noloco", "outer_every": 10},
    "co2-10": {"outer": "co2", "outer_every": 10},
}


def config(name: str, steps: int, replicas: int, outer_lr=None, outer_momentum=None):
    from paxlike.experiments import transformer
    cfg = transformer.get_config("tiny")
    cfg.update(steps=steps, log_every=50, eval_every=steps, checkpoint_every=0,
               async_checkpoints=False)
    cfg.mesh.data, cfg.mesh.fsdp = replicas, 1
    cfg.metrics.plot = cfg.metrics.tensorboard = False
    cfg.optimizer.update(RUNS[name])
    for key, value in (("outer_lr", outer_lr), ("outer_momentum", outer_momentum)):
        if value is not None:
            cfg.optimizer[key] = value
    return cfg


def bytes_per_step(cfg, replicas: int) -> dict:
    """Bytes each device sends over `data` per step: compiled (inner and outer programs averaged
    over H steps) and predicted by the planner."""
    import jax
    from paxlike.mesh import build_mesh
    from paxlike.planner import cost, fleets, hlo
    from paxlike.trainer import Trainer
    mesh = build_mesh({"data": replicas, "fsdp": 1}, devices=jax.devices()[:replicas])
    trainer = Trainer(cfg, mesh)

    def data_bytes(sync):
        text = trainer.compile(sync=sync).as_text()
        # every collective: `data` is the mesh's only axis of size > 1 (XLA:CPU does not name
        # the groups of collectives inside loops)
        return sum(op["runs"] * op["bytes"] for op in hlo.collective_ops(text, replicas))

    inner = data_bytes(())
    if trainer.outer is None:
        compiled = inner
    else:
        every, syncs = trainer.outer.every, [(f,) for f in range(trainer.outer.fragments)]
        compiled = (sum(data_bytes(s) for s in syncs) + (every - len(syncs)) * inner) / every
    plan = cost.Plan.make({"data": replicas, "fsdp": 1}, {}, cfg.sharding, cfg.microbatches,
                          cfg.model.remat)
    fleet = fleets.parse_fleet(f"cpu-{replicas}")
    predicted = cost.estimate(cfg, plan, fleet, "cpu").comm
    return {"compiled": compiled, "inner": inner,
            "predicted": sum(v for k, v in predicted.items() if k.startswith("data/"))}


def co2_schedule(topology: str, slices: int) -> None:
    """Prints the schedule of CO2's outer-step program around its `data` collectives."""
    import re
    from paxlike.compiled import topology_devices
    from paxlike.experiments import transformer
    from paxlike.mesh import build_mesh
    from paxlike.trainer import Trainer
    cfg = transformer.get_config("125m")
    cfg.batch_size, cfg.seq_len = 32, 512
    cfg.optimizer.update(outer="co2", outer_every=10)
    devices = topology_devices(topology, slices)
    mesh = build_mesh({"data": 2, "fsdp": len(devices) // 2}, {"data": min(slices, 2)}, devices)
    text = Trainer(cfg, mesh).compile(sync=(0,)).as_text()
    entry = text[text.index("\nENTRY"):]
    lines = entry[:entry.index("\n}\n")].splitlines()[1:]
    ops = [m.group(2) for m in (re.match(r"\s*(ROOT )?%?[\w.\-]+ = .*? ([\w\-]+)\(", l)
                                 for l in lines) if m]
    print(f"CO2 outer-step program, 125m, data 2 x fsdp {len(devices) // 2} on {slices} x "
          f"{topology}: {len(ops)} instructions in the step's schedule")
    big = [(i, op) for i, op in enumerate(ops) if op in (
        "while", "all-reduce", "all-reduce-start", "all-reduce-done", "send", "recv-done")]
    for i, op in big:
        print(f"  {i:5d} {op}")
    sends = [i for i, op in enumerate(ops) if op in ("send", "all-reduce-start")]
    dones = [i for i, op in enumerate(ops) if op in ("recv-done", "all-reduce-done")]
    if sends and dones:
        between = [op for op in ops[min(sends):max(dones)] if op in ("fusion", "custom-call")]
        loops = [i for i, op in enumerate(ops) if op == "while" and min(sends) < i < max(dones)]
        print(f"  asynchronous transfers from {min(sends)} to {max(dones)}: {len(between)} "
              f"fusions / kernels and {len(loops)} layer loops run meanwhile")


def train(cfg, workdir: str) -> dict:
    from paxlike import loop
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    loop.run(cfg, workdir)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {"eval_loss": evals[-1]["eval_loss"], "last_train": sum(train_losses[-5:]) / 5,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/lowcomm")
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--bytes_only", action="store_true")
    parser.add_argument("--outer_lr", type=float, default=None, help="default: 0.7")
    parser.add_argument("--outer_momentum", type=float, default=None, help="default: 0.9")
    parser.add_argument("--co2_schedule", default="", help="a TPU topology, e.g. v5e:2x4")
    parser.add_argument("--slices", type=int, default=1)
    args = parser.parse_args()
    if args.co2_schedule:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        co2_schedule(args.co2_schedule, args.slices)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    jax.config.update("jax_num_cpu_devices", args.replicas)
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from gla import machine

    names = args.only.split(",")
    rows = {}
    for name in names:
        cfg = config(name, args.steps, args.replicas, args.outer_lr, args.outer_momentum)
        rows[name] = bytes_per_step(cfg, args.replicas)
        if not args.bytes_only:
            rows[name].update(train(cfg, os.path.join(args.workdir, name)))
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)

    base = rows.get("sync", {})
    lr = 0.7 if args.outer_lr is None else args.outer_lr
    momentum = 0.9 if args.outer_momentum is None else args.outer_momentum
    print(f"\n{machine()}; tiny Transformer, {args.replicas} data shards / replicas, "
          f"{args.steps} steps, batch 16 x 128, AdamW inner, outer lr {lr} / momentum "
          f"{momentum}\n")
    print("| run | bytes / step / device over data (compiled) | planner | vs sync | eval loss "
          "| vs sync | last-5 train loss | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        ratio = base["compiled"] / row["compiled"] if base and row["compiled"] else float("inf")
        loss = row.get("eval_loss")
        rel = (f"{100 * (loss / base['eval_loss'] - 1):+.2f}%"
               if loss is not None and "eval_loss" in base else "-")
        print(f"| {name} | {row['compiled'] / 1e6:.3f} MB | {row['predicted'] / 1e6:.3f} MB | "
              f"1/{ratio:.1f} | {loss if loss is None else round(loss, 4)} | {rel} | "
              f"{row.get('last_train', float('nan')):.4f} | {row.get('seconds', 0):.0f} |")


if __name__ == "__main__":
    main()
