"""Context parallelism for softmax attention: ring attention (kernels/attention/ring.py) against
GSPMD's all-gather of keys and values, the sequence split over n devices.

    .venv/bin/python benchmarks/context.py [--T 8192,32768] [--devices 1,2,4,8] [--time_T 4096]
        [--rnn_T 32768] [--splash_T 8192] [--parts attention,pararnn,splash]

1. Memory: for each T and n, the forward+backward program of causal attention over one packed
   row (B = 1, H = 16 query heads, 4 KV heads, head dim 64, float32) is compiled on n emulated
   CPU devices and its memory per device printed (XLA memory_analysis: arguments + outputs +
   temporaries - aliased). "all_gather": `jax.nn.dot_product_attention` on q, k, v sharded over
   the length (what model.context_parallel=all_gather compiles to); "ring": ring attention in a
   shard_map. Compile only: the n = 1 programs do not fit this machine's memory at T = 32768.
2. Work per device of causal attention, natural vs zigzag order (the data pipeline's order
   under ring attention): visible query-key pairs and ring steps that are not skipped.
3. CPU time at --time_T, ring vs all-gather on 8 emulated devices, side by side (interleaved,
   median of 5); the emulated devices share this machine's cores, so this compares the work
   the two programs do, not a cluster's speed.
4. ParaRNN: compiled memory per device of a ParaGRU layer's Newton solve, forward+backward
   (B = 1, d = 256, float32, 3 iterations, associative scan), at --rnn_T for each n: the length
   whole on every device (the sequence gathered) vs split over the devices
   (`solve(axis_name=...)`, the blocks passing states on).
5. Splash attention on TPU (needs the `tpu` extra: libtpu compiles for a v5p topology ahead of
   time, no TPU needed): compiled memory per chip of a Transformer train step (2 layers, d 256,
   4 / 2 heads, batch 8, remat full) at --splash_T, model.attention_impl xla vs splash (and,
   with context, ring attention with XLA or splash blocks), without
   context parallelism (fsdp 8 on v5p:2x2x2) and with all-gather context parallelism (context 4
   x fsdp 4 on v5p:2x2x4), beside the planner's prediction for each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/gla.py's machine()

import jax                      # noqa: E402
import jax.numpy as jnp         # noqa: E402
import numpy as np              # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gla import machine        # noqa: E402
from paxlike.kernels.attention import dense_attention, ring_attention, zigzag_order  # noqa: E402
from paxlike.kernels import pararnn  # noqa: E402
from paxlike.kernels.pararnn import cells  # noqa: E402

B, H, KV, D = 1, 16, 4, 64


def programs(n: int):
    """{"all_gather": f, "ring": f}: (q, k, v, pos, seg) -> (loss, grads), jitted for n devices."""
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    seq, ids = P(None, "context", None, None), P(None, "context")
    ring = jax.shard_map(
        lambda q, k, v, pos, seg: ring_attention(q, k, v, pos, pos, seg, seg, axis_name="context"),
        mesh=mesh, in_specs=(seq, seq, seq, ids, ids), out_specs=seq, check_vma=False)

    def grads(attend):
        def loss(q, k, v, pos, seg):
            o = attend(q, k, v, pos, seg)
            return jnp.sum(o * o)
        shard = lambda spec: NamedSharding(mesh, spec)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)),
                       in_shardings=(shard(seq),) * 3 + (shard(ids),) * 2)
    return {"all_gather": grads(dense_attention), "ring": grads(ring)}


def pararnn_programs(n: int, d: int = 256):
    """{"gathered": f, "split": f}: (params, x [1, T, 3, d]) -> grads, the solve per device."""
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))

    def program(split: bool):
        length = "context" if split else None

        def solve(p, x):
            h0 = jnp.zeros((x.shape[0], d), jnp.float32)
            return pararnn.solve(lambda h, xx: cells.paragru_cell(p, h, xx), h0, x, impl="xla",
                                 axis_name="context" if split else None)
        per_device = jax.shard_map(solve, mesh=mesh, in_specs=(P(), P(None, length)),
                                   out_specs=P(None, length), check_vma=False)
        loss = lambda p, x: jnp.sum(jnp.tanh(per_device(p, x)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(
            NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "context"))))
    return {"gathered": program(False), "split": program(True)}


def pararnn_inputs(T: int, d: int = 256):
    params = jax.eval_shape(lambda: cells.init_paragru(jax.random.PRNGKey(0), d))
    return params, jax.ShapeDtypeStruct((1, T, 3, d), jnp.float32)


def inputs(T: int, abstract: bool):
    shapes = [(B, T, H, D), (B, T, KV, D), (B, T, KV, D)]
    if abstract:
        return ([jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
                + [jax.ShapeDtypeStruct((B, T), jnp.int32)] * 2)
    r = np.random.default_rng(0)
    return ([jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes]
            + [jnp.arange(T, dtype=jnp.int32)[None], jnp.ones((B, T), jnp.int32)])


def memory_mib(f, args) -> float:
    m = f.lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2 ** 20


def work(T: int, n: int, order) -> tuple[list[int], list[int]]:
    """Per device: visible causal (query, key) pairs, and ring steps with any visible pair."""
    pos = np.asarray(order).reshape(n, -1)
    pairs, steps = [], []
    for i in range(n):
        seen = [int((pos[j][None, :] <= pos[i][:, None]).sum()) for j in range(n)]
        pairs.append(sum(seen))
        steps.append(sum(1 for s in seen if s))
    return pairs, steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", default="8192,32768")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--time_T", type=int, default=4096)
    p.add_argument("--rnn_T", type=int, default=32768)
    p.add_argument("--splash_T", type=int, default=8192)
    p.add_argument("--parts", default="attention,pararnn,splash",
                   help="attention (sections 1-3), pararnn (section 4), splash (section 5)")
    a = p.parse_args()
    parts = set(a.parts.split(","))
    if not parts or parts - {"attention", "pararnn", "splash"}:
        p.error(f"--parts={a.parts}: choose from attention, pararnn, splash (comma-separated)")
    print(f"machine: {machine()}")
    if "attention" in parts:
        attention_tables(a)
    if "pararnn" in parts:
        pararnn_table(a)
    if "splash" in parts:
        splash_table(a)


def attention_tables(a):
    print(f"B={B} H={H} KV={KV} D={D} float32, causal, forward+backward\n")
    print("| T | devices | all-gather MiB/device | x of n=1 | ring MiB/device | x of n=1 | ring / all-gather |")
    print("|---|---|---|---|---|---|---|")
    for T in (int(t) for t in a.T.split(",")):
        base = {}
        for n in (int(d) for d in a.devices.split(",")):
            mem = {name: memory_mib(f, inputs(T, abstract=True))
                   for name, f in programs(n).items()}
            base = base or mem
            print(f"| {T} | {n} | {mem['all_gather']:.0f} | {mem['all_gather'] / base['all_gather']:.2f} | "
                  f"{mem['ring']:.0f} | {mem['ring'] / base['ring']:.2f} | "
                  f"{mem['ring'] / mem['all_gather']:.3f} |", flush=True)

    print("\n| T | devices | order | visible pairs per device (max / min) | ring steps computed per device |")
    print("|---|---|---|---|---|")
    T = 32768
    for n in (2, 4, 8):
        for name, order in (("natural", np.arange(T)), ("zigzag", zigzag_order(T, n))):
            pairs, steps = work(T, n, order)
            print(f"| {T} | {n} | {name} | {max(pairs) / min(pairs):.2f} | {steps} |")

    T, n = a.time_T, 8
    args = inputs(T, abstract=False)
    fs = programs(n)
    for f in fs.values():
        jax.block_until_ready(f(*args))
    times = {name: [] for name in fs}
    for _ in range(5):
        for name, f in fs.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    (ag_loss, _), (ring_loss, _) = (fs[k](*args) for k in ("all_gather", "ring"))
    ag, ring = (statistics.median(times[k]) for k in ("all_gather", "ring"))
    print(f"\nCPU time, T={T}, {n} emulated devices, forward+backward, median of 5 interleaved: "
          f"all-gather {ag * 1e3:.0f} ms, ring {ring * 1e3:.0f} ms (ring / all-gather "
          f"{ring / ag:.2f}); losses {float(ag_loss):.6g} and {float(ring_loss):.6g}")


def pararnn_table(a):
    print(f"\nParaGRU Newton solve, forward+backward, B=1, d=256, T={a.rnn_T}, float32\n")
    print("| devices | length gathered MiB/device | x of n=1 | length split MiB/device | x of n=1 |")
    print("|---|---|---|---|---|")
    base = {}
    for n in (int(d) for d in a.devices.split(",")):
        mem = {name: memory_mib(f, pararnn_inputs(a.rnn_T))
               for name, f in pararnn_programs(n).items()}
        base = base or mem
        print(f"| {n} | {mem['gathered']:.0f} | {mem['gathered'] / base['gathered']:.2f} | "
              f"{mem['split']:.0f} | {mem['split'] / base['split']:.2f} |", flush=True)


def splash_table(a):
    from paxlike.compiled import compile_plan, topology_devices
    from paxlike.experiments import transformer
    from paxlike.planner import cost, fleets
    print(f"\nTransformer train step on v5p (AOT), T={a.splash_T}: memory per chip\n")
    print("| plan | context_parallel | attention | compiled GiB/chip | planner GiB/chip | "
          "/ all_gather xla (compiled) |")
    print("|---|---|---|---|---|---|")
    all_gather = [("all_gather", "xla"), ("all_gather", "splash")]
    for sizes, topology, variants in (
            ({"fsdp": 8}, "v5p:2x2x2", all_gather),
            ({"context": 4, "fsdp": 4}, "v5p:2x2x4",
             all_gather + [("ring", "xla"), ("ring", "splash")])):
        plan = cost.Plan.make(sizes, {}, "fsdp_tp", 1, "full")
        fleet = fleets.fleet_for_devices(topology_devices(topology))
        baseline = None
        for context_parallel, impl in variants:
            cfg = transformer.get_config("125m")
            cfg.model.update(num_layers=2, d_model=256, num_heads=4, num_kv_heads=2,
                             mlp_dim=512, vocab_size=1024, remat="full", attention_impl=impl,
                             context_parallel=context_parallel)
            cfg.batch_size, cfg.seq_len = 8, a.splash_T
            report = compile_plan(cfg, topology_devices(topology), plan)
            compiled = report["bytes_per_device"] / 2 ** 30
            baseline = baseline or compiled
            predicted = cost.estimate(cfg, plan, fleet).bytes_per_device / 2 ** 30
            name = " x ".join(f"{k} {v}" for k, v in sizes.items())
            print(f"| {name} | {context_parallel} | {impl} | {compiled:.3f} | {predicted:.3f} | "
                  f"{compiled / baseline:.3f} |", flush=True)

if __name__ == "__main__":
    main()
