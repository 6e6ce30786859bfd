"""CPU speed and compiled memory of the MoE dispatch paths, side by side in one run.

    python benchmarks/moe.py [--steps=5] [--batch_size=8] [--seq_len=128] [--size=small]

The `small` MoE Transformer (experiments/moe.py:small: d_model 256, 8 layers, 16 experts top-2,
expert MLP 512) trains on one random batch (byte-range tokens) with paxlike's own train step
(`paxlike.trainer.Trainer`: explicit shardings, donation), once per dispatch path
(docs/moe.md, "Dispatch"):

  reference  model.moe_dispatch=reference: every expert on every token (E x the expert FLOPs)
  capacity   model.capacity_factor=1.25: the dense [E, C, d] buffer, assignments past C dropped
  dropless   model.capacity_factor=0 on one device: sort + grouped matmuls (ragged_dot)
  EP         model.capacity_factor=0 on 8 emulated CPU devices, mesh expert=8 (the batch split
             8 ways, 2 experts per device): the expert-parallel shard_map with the padded
             all-to-all exchange (XLA:CPU has no ragged all-to-all)

The first three run on one CPU device, EP on eight; the process has eight (jax_num_cpu_devices),
so the four compiled steps are timed interleaved, step by step, under the same load. The eight
emulated devices share the same cores as the one device does: EP's tokens/s on CPU measures the
overhead of the exchange and of running 8 programs on 2 cores, not a speedup.

Memory is the compiled train step's `memory_analysis()` per device: argument bytes (state and
batch) + temp bytes (the step's working memory). For EP the all-to-all traffic per device per
step is read from the compiled program's HLO (`paxlike.planner.hlo.collectives`), beside the
planner's prediction when the planner describes the MoE family (`paxlike.planner.cost`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/gla.py's machine()

EP_DEVICES = 8


def machine() -> str:
    """benchmarks/gla.py's machine line, with the device count."""
    import jax
    from gla import machine as host
    return f"{host()} | {jax.device_count()} emulated devices"


def _time_interleaved(fns: dict, steps: int, progress) -> dict[str, float]:
    """Median seconds per call of each blocking `fn()`, calling them in turn so that load from
    other processes on this shared machine hits all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        progress(f"  round {len(times[name])}/{steps}: " + ", ".join(
            f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:,.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="global batch in sequences (small's own is 32); divisible by 8")
    parser.add_argument("--seq_len", type=int, default=128, help="small's own is 256")
    parser.add_argument("--paths", default="reference,capacity,dropless,EP")
    args = parser.parse_args()
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]

    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", EP_DEVICES)
    import numpy as np

    from paxlike.experiments import moe as experiment
    from paxlike.mesh import MESH_AXES, build_mesh
    from paxlike.planner import cost, fleets, hlo
    from paxlike.trainer import Trainer

    t0 = time.perf_counter()
    where = machine()

    def progress(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    one, all_devices = jax.devices()[:1], jax.devices()[:EP_DEVICES]
    paths = {  # name: (model overrides, mesh sizes, devices)
        "reference": ({"moe_dispatch": "reference", "capacity_factor": 0.0}, {}, one),
        "capacity": ({"capacity_factor": 1.25}, {}, one),
        "dropless": ({"capacity_factor": 0.0}, {}, one),
        "EP": ({"capacity_factor": 0.0}, {"expert": EP_DEVICES, "fsdp": 1}, all_devices),
    }
    paths = {k: v for k, v in paths.items() if k in wanted}

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.seq_len)
    tokens = rng.integers(0, 256, (args.batch_size, args.seq_len + 1), dtype=np.int32)
    host_batch = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape).copy(),
        "weights": np.ones(shape, np.float32),
    }

    runs, fns = {}, {}
    for name, (overrides, sizes, devices) in paths.items():
        cfg = experiment.get_config(args.size)
        cfg.update(batch_size=args.batch_size, seq_len=args.seq_len, steps=1000)
        cfg.model.update(overrides)
        for axis, n in sizes.items():
            cfg.mesh[axis] = n
        mesh = build_mesh({a: cfg.mesh[a] for a in MESH_AXES}, devices=devices)
        progress(f"{name}: building the trainer on {len(devices)} device(s), mesh "
                 f"{dict(mesh.shape)}")
        trainer = Trainer(cfg, mesh)
        state = trainer.init_state()
        start = time.perf_counter()
        compiled = trainer.compile(state)
        compile_s = time.perf_counter() - start
        progress(f"{name}: compiled the train step in {compile_s:.1f} s")
        m = compiled.memory_analysis()
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host_batch.items()}
        run = {"cfg": cfg, "trainer": trainer, "state": state, "batch": batch, "mesh": mesh,
               "devices": devices, "compile_s": compile_s, "args": m.argument_size_in_bytes,
               "temp": m.temp_size_in_bytes, "hlo": compiled.as_text() if name == "EP" else None,
               "metrics": None}
        runs[name] = run

        def step(run=run):
            run["state"], metrics = run["trainer"].train_step(run["state"], run["batch"])
            run["metrics"] = jax.block_until_ready(metrics)
        start = time.perf_counter()
        step()   # warm-up (the first call also checks that the step runs)
        progress(f"{name}: first step {time.perf_counter() - start:.2f} s, loss "
                 f"{float(run['metrics']['loss']):.4f}")
        fns[name] = step

    progress(f"timing {args.steps} steps of each path, interleaved")
    seconds = _time_interleaved(fns, args.steps, progress)

    cfg = next(iter(runs.values()))["cfg"]
    mdl = cfg.model
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print()
    print(f"machine: {where}")
    print(f"model: experiments/moe.py:{args.size} (d_model={mdl.d_model}, {mdl.num_layers} layers, "
          f"{mdl.num_experts} experts top-{mdl.experts_per_token}, expert mlp "
          f"{mdl.expert_mlp_dim}, vocab {mdl.vocab_size}), float32; batch shrunk to "
          f"{cfg.batch_size} x {cfg.seq_len} tokens (small trains 32 x 256); random tokens; "
          f"median of {args.steps} interleaved steps after one warm-up")
    print()
    base = runs.get("dropless")
    print("| path | devices | ms/step | tokens/s | vs dropless | dropped | args MiB/dev | "
          "temp MiB/dev | args+temp MiB/dev | vs dropless | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        s = seconds[name]
        mem = run["args"] + run["temp"]
        speed = f"{seconds['dropless'] / s:.2f}x" if base else "-"
        mem_ratio = f"{mem / (base['args'] + base['temp']):.2f}x" if base else "-"
        dropped = float(run["metrics"]["moe_dropped"])
        print(f"| {name} | {len(run['devices'])} | {s * 1e3:,.0f} | {tokens_per_step / s:,.0f} | "
              f"{speed} | {100 * dropped:.1f}% | {_mib(run['args'])} | {_mib(run['temp'])} | "
              f"{_mib(mem)} | {mem_ratio} | {run['compile_s']:.1f} |")
    print()
    print("tokens/s is the global batch's tokens over the step time. EP's 8 devices are emulated "
          "on the same CPU cores as the one-device paths, so its figure is the cost of the "
          "exchange and of 8 device programs sharing the cores, not a speedup; its memory is "
          "per device (1/8 of the batch, 2 of the 16 experts).")

    if "EP" in runs:
        run = runs["EP"]
        ep_cfg = run["cfg"]
        found = hlo.collectives(run["hlo"], EP_DEVICES)
        predicted = None
        if cost.has_profile(ep_cfg):
            plan = cost.Plan.make(dict(run["mesh"].shape), None, ep_cfg.sharding,
                                  ep_cfg.microbatches, ep_cfg.model.remat)
            predicted = cost.estimate(ep_cfg, plan, fleets.fleet_for_devices(run["devices"]),
                                      "cpu")
        print()
        print(f"EP collectives per train step, read from the compiled HLO "
              f"(paxlike.planner.hlo.collectives, {EP_DEVICES} devices)"
              + (", beside the planner's prediction (paxlike.planner.cost.estimate)"
                 if predicted else "") + ":")
        print()
        print("| collective | executions/step | MiB sent/device/step | full-buffer MiB/step |"
              + (" planner full-buffer MiB/step |" if predicted else ""))
        print("|---|---|---|---|" + ("---|" if predicted else ""))
        for kind, v in found.items():
            want = predicted.comm_by_kind.get(kind, 0.0) if predicted else 0.0
            if v["count"] or want:
                print(f"| {kind} | {v['count']} | {_mib(v['bytes'])} | {_mib(v['volume'])} |"
                      + (f" {_mib(want)} |" if predicted else ""))
        a2a = found["all-to-all"]["bytes"] + found["ragged-all-to-all"]["bytes"]
        print()
        print(f"all-to-all bytes sent per device per step, compiled: {a2a:,.0f} "
              f"({_mib(a2a)} MiB)")
        if predicted:
            volume = sum(predicted.comm_by_kind.get(k, 0.0)
                         for k in ("all-to-all", "ragged-all-to-all"))
            compiled_volume = found["all-to-all"]["volume"] + found["ragged-all-to-all"]["volume"]
            print(f"all-to-all full-buffer volume per step: compiled {compiled_volume:,.0f}, "
                  f"planner {volume:,.0f} ({volume / max(compiled_volume, 1):.3f}x)")
            sent = sum(v["bytes"] for v in found.values())
            print(f"bytes sent per device per step, every collective: compiled {_mib(sent)} MiB; "
                  "planner " + ", ".join(f"{k} {_mib(v)} MiB"
                                         for k, v in sorted(predicted.comm.items())))
            print(f"memory per device: compiled args+temp {_mib(run['args'] + run['temp'])} MiB; "
                  f"planner {_mib(predicted.bytes_per_device)} MiB")
        else:
            print(f"planner prediction: none ({ep_cfg.model.module} declares no "
                  f"planner_profile; paxlike/family.py)")
    progress("done")


if __name__ == "__main__":
    main()
