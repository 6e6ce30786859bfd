"""ParaRNN solver timings: reference lax.scan vs Newton + associative scan vs Newton + Pallas.

ParaGRU cell (published initialisation, d channels, inputs already projected), batch B = 8.
Forward and forward+backward (grad of a weighted sum, custom VJP) per impl, median wall time of
jitted calls after compilation and one warm-up. Prints the machine, the backend, the load average
(other jobs on the machine distort CPU timings) and what ``impl="auto"`` picks, with its ratio to
the faster of "reference" (lax.scan of the cell) and "xla" (Newton + lax.associative_scan).

    .venv/bin/python benchmarks/pararnn.py            # full table (L in 512..32768, d in 256, 1024)
    .venv/bin/python benchmarks/pararnn.py --quick    # L in 512, 2048; d = 256

On CPU "pallas" is the interpreted kernel (for information only: interpret mode is not a
performance path). Configurations whose estimated working set exceeds --max-gib are skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from paxlike.kernels import pararnn  # noqa: E402
from paxlike.kernels.pararnn import cells  # noqa: E402

IMPLS = tuple(i for i in pararnn.IMPLS if i != "auto")   # reference, xla, pallas
# Rough live fp32 arrays of size B*L*d (inputs are 3 of them), measured loosely from XLA's
# buffer assignment; only used to skip configurations that would not fit.
_WORKING_SET = {("reference", "fwd"): 6, ("reference", "fwd+bwd"): 14,
                ("xla", "fwd"): 16, ("xla", "fwd+bwd"): 24,
                ("pallas", "fwd"): 12, ("pallas", "fwd+bwd"): 18}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return (f"{platform.node()} | {cpu} | {os.cpu_count()} cores | backend {jax.default_backend()}"
            f" ({dev.device_kind}) | jax {jax.__version__}")


def timed(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
        if times[-1] > 5.0:  # long runs: one measurement is enough
            break
    return statistics.median(times)


def programs(impl, params, d):
    def fwd(x, h0):
        cell = lambda h, xx: cells.paragru_cell(params, h, xx)  # noqa: E731
        return pararnn.solve(cell, h0, x, impl=impl, warn=False)

    def loss(p, x, h0):
        cell = lambda h, xx: cells.paragru_cell(p, h, xx)  # noqa: E731
        hs = pararnn.solve(cell, h0, x, impl=impl, warn=False)
        return jnp.sum(hs * jnp.cos(jnp.arange(d, dtype=hs.dtype)))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    return fwd, lambda x, h0: grad(params, x, h0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L in {512, 2048}, d = 256")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--widths", type=int, nargs="*", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--max-gib", type=float, default=6.0,
                    help="skip a configuration whose estimated working set exceeds this")
    args = ap.parse_args()
    lengths = args.lengths or ([512, 2048] if args.quick else [512, 2048, 8192, 32768])
    widths = args.widths or ([256] if args.quick else [256, 1024])

    print(f"# machine: {machine()}")
    print(f"# load average at start: {os.getloadavg()}")
    print(f"# ParaGRU, B={args.batch}, fp32, 3 Newton iterations; times in ms (median of <= "
          f"{args.repeats} after warm-up); 'skip' = estimated > {args.max_gib} GiB")
    head = ["L", "d"] + [f"{i} {m}" for m in ("fwd", "fwd+bwd") for i in args.impls]
    head += ["auto", "auto/best(reference,xla) fwd", "fwd+bwd"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d in widths:
        key = jax.random.PRNGKey(0)
        params = cells.init_paragru(key, d)
        for length in lengths:
            x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, length, 3, d))
            h0 = jnp.zeros((args.batch, d))
            unit_gib = args.batch * length * d * 4 / 2 ** 30
            res = {}
            for mode in ("fwd", "fwd+bwd"):
                for impl in args.impls:
                    if _WORKING_SET[(impl, mode)] * unit_gib > args.max_gib:
                        res[(impl, mode)] = None
                        continue
                    fwd, fwdbwd = programs(impl, params, d)
                    res[(impl, mode)] = timed(fwd if mode == "fwd" else fwdbwd, (x, h0),
                                              args.repeats)
            auto = pararnn.choose_impl("auto", kind="diagonal", batch=args.batch, length=length,
                                       width=d)
            row = [str(length), str(d)]
            row += ["skip" if res[(i, m)] is None else f"{1e3 * res[(i, m)]:.1f}"
                    for m in ("fwd", "fwd+bwd") for i in args.impls]
            row.append(auto)
            for mode in ("fwd", "fwd+bwd"):
                cand = [res.get((i, mode)) for i in ("reference", "xla")]
                cand = [c for c in cand if c is not None]
                mine = res.get((auto, mode))
                row.append(f"{mine / min(cand):.2f}" if cand and mine is not None else "n/a")
            print("| " + " | ".join(row) + " |", flush=True)
            del x
    print(f"# load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
