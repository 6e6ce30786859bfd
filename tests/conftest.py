"""Every test runs on 8 emulated CPU devices, set once before JAX starts."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA:CPU compiling small programs, and a third of a compile is LLVM
# optimising machine code that then runs for milliseconds. The tests skip that step: the XLA
# programs (HLO, sharding, fusion, buffer assignment) are the same ones users run, only the CPU
# code is less optimised. Subprocess tests inherit the flag. (The TPU compiler ignores it: the
# AOT tests' memory and collectives were checked to be identical with and without.)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Many tests compile the same small programs on the same meshes: share the compiled executables
# between them, in a fresh temporary directory (nothing leaks between sessions) that the pytest
# process makes once and its xdist workers and their subprocesses inherit through the environment.
# Every program is cached, however quick its compile: the many small ones (initializers, eager
# operations on sharded arrays) repeat across tests and processes (7% off the trainer tests).
import tempfile  # noqa: E402

if not os.environ.get("PAXLIKE_TEST_JIT_CACHE"):
    os.environ["PAXLIKE_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="paxlike-test-jit-")
jax.config.update("jax_compilation_cache_dir", os.environ["PAXLIKE_TEST_JIT_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
