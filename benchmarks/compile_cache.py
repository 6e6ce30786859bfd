"""Start-up time of `python -m paxlike.train` with an empty and with a warm persistent
compilation cache (`compilation_cache`, paxlike/train.py): the same short run three times per
config in a fresh cache directory (the first fills it), interleaved config by config. Reports the
wall time to the end of the run and the train step's compile time as the run logs it.

    python benchmarks/compile_cache.py [--repeats=2]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "transformer tiny": "experiments/transformer.py:tiny",
    "gla tiny": "experiments/gla.py:tiny",
    "moe tiny": "experiments/moe.py:tiny",
}
_COMPILED = re.compile(r"compiled the train step in ([0-9.]+) s")


def one_run(config: str, cache: str, workdir: str) -> tuple[float, float]:
    """(wall seconds, logged train-step compile seconds) of a 2-step run without eval."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "paxlike.train", f"--config={config}", f"--workdir={workdir}",
         "--config.steps=2", "--config.eval_every=0", "--config.checkpoint_every=0",
         f"--config.compilation_cache={cache}"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    return wall, float(_COMPILED.search(out.stderr).group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per config")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="paxlike-cache-bench-")
    results = {name: {"cold": None, "warm": []} for name in CONFIGS}
    try:
        for attempt in range(1 + args.repeats):
            for name, config in CONFIGS.items():
                cache = os.path.join(scratch, name.replace(" ", "-"), "cache")
                workdir = os.path.join(scratch, name.replace(" ", "-"), f"run{attempt}")
                measured = one_run(config, cache, workdir)
                if attempt == 0:
                    results[name]["cold"] = measured
                else:
                    results[name]["warm"].append(measured)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{platform.node()} ({os.cpu_count()} CPU cores), CPU backend, 2 train steps, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| config | empty cache: wall s, compile s | warm cache: wall s, compile s | "
          "start-up saved |\n|---|---|---|---|")
    for name, r in results.items():
        (cold_wall, cold_compile), warm = r["cold"], r["warm"]
        warm_wall = min(w for w, _ in warm)
        warm_compile = min(c for _, c in warm)
        print(f"| {name} | {cold_wall:.1f}, {cold_compile:.1f} | {warm_wall:.1f}, "
              f"{warm_compile:.2f} | {cold_wall - warm_wall:.1f} s "
              f"({1 - warm_wall / cold_wall:.0%}) |")


if __name__ == "__main__":
    main()
