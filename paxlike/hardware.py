"""Peak compute of the devices a run uses, the denominator of MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,   # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


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
    kind = devices[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return flops * len(devices)
    processes = len({d.process_index for d in devices})
    return measure_gemm_flops(dtype) * processes
