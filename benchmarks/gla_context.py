"""Memory of GLA context parallelism: the sequence split over n devices (kernels/gla/context.py).

    .venv/bin/python benchmarks/gla_context.py [--T 8192,32768] [--devices 1,2,4,8]

For each T and n, the forward+backward program of `sequence_sharded_gla` (XLA path, fp32,
B = 1, H = 8, K = 64, V = 128 as in benchmarks/gla.py) is compiled on n emulated CPU devices
(`shard_map`, the length split n ways) and its compiled memory per device is printed (XLA
memory_analysis: arguments + outputs + temporaries - aliased). Each row also runs the program once
and gives the relative RMS difference of the output from n = 1, so the table is of a program that
computes the same thing. Memory per device should fall ~1/n: that is what lets one sequence be
longer than one device's memory. (No timings: emulated devices share the same two cores.)
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                      # noqa: E402
import jax.numpy as jnp         # noqa: E402
import numpy as np              # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from paxlike.kernels.gla.context import sequence_sharded_gla  # noqa: E402

B, H, K, V = 1, 8, 64, 128


def program(n: int):
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    seq = P(None, "context")
    blocks = jax.shard_map(
        lambda q, k, v, g: sequence_sharded_gla(q, k, v, g, axis_name="context", impl="xla")[0],
        mesh=mesh, in_specs=(seq,) * 4, out_specs=seq, check_vma=False)

    def loss(q, k, v, g):
        o = blocks(q, k, v, g)
        return jnp.sum(o * o), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", default="8192,32768")
    p.add_argument("--devices", default="1,2,4,8")
    a = p.parse_args()
    r = np.random.default_rng(0)
    print(f"jax {jax.__version__} ({jax.default_backend()}), {len(jax.devices())} emulated devices; "
          f"B={B} H={H} K={K} V={V} fp32, forward+backward")
    print(f"{'T':>7} {'devices':>8} | {'MiB per device':>15} {'x of n=1':>9} | {'o vs n=1':>9}")
    for T in (int(t) for t in a.T.split(",")):
        q, k = (jnp.asarray(r.standard_normal((B, T, H, K)), jnp.float32) for _ in range(2))
        v = jnp.asarray(r.standard_normal((B, T, H, V)), jnp.float32)
        g = jax.nn.log_sigmoid(jnp.asarray(r.standard_normal((B, T, H, K)), jnp.float32)) / 16
        base_mem, base_o = None, None
        for n in (int(d) for d in a.devices.split(",")):
            f = program(n)
            m = f.lower(q, k, v, g).compile().memory_analysis()
            mem = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes) / 2 ** 20
            o = np.asarray(f(q, k, v, g)[0][1])
            base_mem = mem if base_mem is None else base_mem
            base_o = o if base_o is None else base_o
            diff = float(np.sqrt(np.mean((o - base_o) ** 2) / np.mean(base_o ** 2)))
            print(f"{T:>7} {n:>8} | {mem:>15.1f} {mem / base_mem:>9.2f} | {diff:>9.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
