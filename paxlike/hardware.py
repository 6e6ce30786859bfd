"""Peak compute of the devices a run uses, the denominator of MFU.

Data-sheet figures live with the other device specs in `paxlike.planner.fleets`."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from paxlike.planner.fleets import device_for_kind  # the one table of device figures


@functools.cache  # one measurement per process and dtype is enough
def measure_gemm_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a jitted n×n×n matrix multiply on the default device (best of `repeats`)."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def peak_flops(devices, dtype, override_tflops_per_device: float = 0.0) -> float:
    """Total peak FLOP/s of `devices`.

    Accelerators: the data-sheet figure per chip. CPU: emulated CPU devices share the host's cores,
    so the peak is the host's measured GEMM rate in the compute dtype (times the process count).
    """
    devices = list(devices)
    if override_tflops_per_device > 0:
        return override_tflops_per_device * 1e12 * len(devices)
    spec = device_for_kind(devices[0].device_kind)
    if spec is not None:
        return spec.peak_flops * len(devices)
    processes = len({d.process_index for d in devices})
    return measure_gemm_flops(dtype) * processes
