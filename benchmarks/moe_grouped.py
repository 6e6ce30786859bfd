"""CPU benchmark of the MoE expert computation on one device: the grouped-matmul implementations
of the dropless path against the capacity path and the dense oracle, forward + backward.

    .venv/bin/python benchmarks/moe_grouped.py                 # the tiny MoE's shape
    .venv/bin/python benchmarks/moe_grouped.py --tokens 8192 --d 256 --f 512 --experts 16

Each path computes Σ y² over the experts' output and its gradients with respect to the tokens,
the router weights and the three expert weights (jitted). Times are the best of --repeats runs;
the paths' runs are interleaved so they see the same load. The ratio column is against the
dropless path with the "xla" (tiled) grouped matmul, the CPU default.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax                      # noqa: E402
import jax.numpy as jnp         # noqa: E402
import numpy as np              # noqa: E402

from gla import machine         # noqa: E402
from paxlike.kernels import moe  # noqa: E402


def paths(ids, args):
    n, k = ids.shape
    e = args.experts
    return {
        "dropless, xla (tiled)": lambda x, w, c: moe.dropless_ffn(x, w, ids, c, impl="xla"),
        "dropless, ragged_dot": lambda x, w, c: moe.dropless_ffn(x, w, ids, c, impl="ragged_dot"),
        f"capacity {args.capacity_factor}": lambda x, w, c: moe.capacity_ffn(
            x, w, ids, c, moe.capacity(n, k, e, args.capacity_factor))[0],
        "reference (every expert, every token)": lambda x, w, c: moe.reference_ffn(x, w, ids, c),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--f", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, d, f, e = args.tokens, args.d, args.f, args.experts
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = moe.ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32)
                            for s in ((e, d, f), (e, d, f), (e, f, d))))
    ids = jnp.asarray(np.argsort(rng.random((n, e)), axis=1)[:, :args.k], jnp.int32)
    combine = jnp.asarray(rng.random((n, args.k)), jnp.float32)

    compiled = {}
    for name, fn in paths(ids, args).items():
        print(f"compiling {name} ...", file=sys.stderr, flush=True)
        grad = jax.jit(jax.grad(lambda x, w, c, fn=fn: jnp.sum(fn(x, w, c) ** 2), argnums=(0, 1, 2)))
        jax.block_until_ready(grad(x, w, combine))
        compiled[name] = grad
    best = {name: float("inf") for name in compiled}
    for _ in range(args.repeats):
        for name, grad in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(grad(x, w, combine))
            best[name] = min(best[name], time.perf_counter() - start)

    base = best["dropless, xla (tiled)"]
    print(f"machine: {machine()}")
    print(f"MoE experts, forward + backward: {n} tokens, d {d}, f {f}, {e} experts, top-{args.k}, "
          f"fp32; best of {args.repeats}")
    print(f"| {'path':<40} | {'ms':>8} | {'vs dropless xla':>15} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 17}|")
    for name, seconds in best.items():
        print(f"| {name:<40} | {1e3 * seconds:8.1f} | {seconds / base:14.2f}x |")


if __name__ == "__main__":
    main()
