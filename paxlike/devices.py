"""Devices as data: what one accelerator chip (or one emulated CPU device) holds and computes.

A device spec gives a chip's memory, dense bf16 peak and links, from the vendors' data sheets
(`DEVICES`); emulated CPU devices are measured (`cpu_device`). The trainer's MFU denominator
(`peak_flops`), the planner's fleets (`paxlike.planner.fleets`) and the mesh's ICI / DCN split
(`paxlike.mesh`, through `dcn_granules`) all read devices from here. This module imports nothing
from the planner.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str                 # fleet-name prefix, e.g. "v5p", "H100", "cpu"
    kinds: tuple[str, ...]    # prefixes of jax `device.device_kind` that mean this device
    hbm_bytes: float          # memory per device usable by a program
    peak_flops: float         # dense bf16 FLOP/s per device
    ici_bytes_per_s: float    # one direction, per link (TPU ICI) or per GPU (NVLink)
    dcn_bytes_per_s: float    # one direction, per device, across slices / nodes
    torus_dims: int = 0       # TPU: 2 or 3 (torus / twisted torus); 0 = switch (GPU) or host
    cores_per_chip: int = 1   # TPU naming: v4-8 / v5p-8 count TensorCores
    max_granule: int = 0      # largest slice (chips) or node (GPUs)
    aot_name: str = ""        # libtpu topology prefix, e.g. "v5p" in "v5p:4x4x4"
    hbm_bytes_per_s: float = 0.0   # memory bandwidth (the planner's roofline for memory-bound work)


# Data-sheet figures (Google Cloud TPU system architecture pages; NVIDIA H100/H200/A100 data
# sheets; HBM bandwidth likewise). ICI: one direction of one link; a TPU chip has 2 links per torus axis (wraparound), so
# a ring collective along one axis moves 2 x this. GPU "ici" is NVLink per GPU (one direction),
# GPU "dcn" the node's InfiniBand per GPU (one 400 Gb/s NIC per H100/H200, 200 Gb/s per A100).
DEVICES: dict[str, DeviceSpec] = {d.name: d for d in (
    DeviceSpec("v4", ("TPU v4",), 32 * GiB, 275e12, 45e9, 6.25e9, 3, 2, 4096, "v4",
               hbm_bytes_per_s=1228e9),
    DeviceSpec("v5e", ("TPU v5 lite", "TPU v5e"), 16 * GiB, 197e12, 45e9, 3.125e9, 2, 1, 256,
               "v5e", hbm_bytes_per_s=819e9),
    DeviceSpec("v5p", ("TPU v5p", "TPU v5"), 95 * GiB, 459e12, 90e9, 6.25e9, 3, 2, 8960, "v5p",
               hbm_bytes_per_s=2765e9),
    DeviceSpec("v6e", ("TPU v6 lite", "TPU v6e"), 32 * GiB, 918e12, 90e9, 12.5e9, 2, 1, 256,
               "v6e", hbm_bytes_per_s=1640e9),
    DeviceSpec("H100", ("NVIDIA H100",), 80e9, 989e12, 450e9, 50e9, 0, 1, 8,
               hbm_bytes_per_s=3350e9),
    DeviceSpec("H200", ("NVIDIA H200",), 141e9, 989e12, 450e9, 50e9, 0, 1, 8,
               hbm_bytes_per_s=4800e9),
    DeviceSpec("A100", ("NVIDIA A100",), 80e9, 312e12, 300e9, 25e9, 0, 1, 8,
               hbm_bytes_per_s=2039e9),
)}


def device_for_kind(device_kind: str) -> DeviceSpec | None:
    """The spec of a jax device kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), None if unknown."""
    best = None
    for spec in DEVICES.values():
        for kind in spec.kinds:
            if device_kind.startswith(kind) and (best is None or len(kind) > best[0]):
                best = (len(kind), spec)
    return best[1] if best else None


# ----------------------------------------------------------------------------------- the host CPU
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


@functools.cache
def cpu_device(num_devices: int) -> DeviceSpec:
    """Emulated CPU devices share the host: memory split evenly, GEMM rate measured once."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flops = measure_gemm_flops(jnp.float32, n=1024, repeats=2)
    # Emulated devices run collectives through shared memory; ~5 GB/s is the copy rate of one core,
    # and the memory bandwidth they share is of the order of 10 GB/s.
    return DeviceSpec("cpu", ("cpu",), memory / num_devices, flops / num_devices, 5e9, 5e9, 0, 1,
                      num_devices, hbm_bytes_per_s=10e9 / num_devices)


# ------------------------------------------------------------------------------- the MFU peak
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


# --------------------------------------------------------------------- the slow-network granules
def dcn_granules(devices) -> tuple[int, bool]:
    """The granules the slow data-centre network joins: (how many, whether they are processes).

    TPU slices when the devices carry a `slice_index` spanning more than one slice; otherwise the
    processes the devices belong to (GPU nodes, CPU hosts, or the hosts of one TPU slice)."""
    devices = list(devices)
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return len(slices), False
    return len({d.process_index for d in devices}), True
