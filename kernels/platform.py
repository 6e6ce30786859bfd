"""What the kernel families share: the `impl` words, the Pallas targets, the choice by platform.

`IMPLS`, the values of a kernel's `impl` argument (docs/gla.md and docs/pararnn.md, "API"):

* "reference": the step-by-step recurrence as a `lax.scan`; exact, the ground truth;
* "xla": the form that is parallel over the sequence, in plain XLA;
* "pallas": the Pallas kernels (compiled on TPU and GPU, interpreted on any other platform);
* "auto": one of the above, picked for the platform the program is lowered for.

`TARGETS`, the Pallas targets: "tpu" (compiled by Mosaic) and "gpu" (compiled by Triton).

Choices are made for the platform a program is *lowered for* (`lax.platform_dependent`), not for
the host's default backend: an ahead-of-time compile for a TPU topology from a CPU host gets the
TPU code, an export for CUDA the GPU code. Every candidate is traced; lowering keeps only the
branch of its own platform.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax

IMPLS = ("auto", "reference", "xla", "pallas")
TARGETS = ("tpu", "gpu")

# Lowering platform -> the Pallas target compiled for it. On any platform not listed (CPU) a
# target's body runs in interpret mode; which body is the kernel's choice (`interpreted_elsewhere`).
NATIVE_TARGETS = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}


def by_lowering_platform(run: Callable[[Any], Any], per_platform: dict, default):
    """run(choice), choice = per_platform[p] for the platform p the program is lowered for and
    `default` for any other platform. A single call, without `lax.platform_dependent`, when every
    platform gets the same choice. Choices must be hashable."""
    if set(per_platform.values()) <= {default}:
        return run(default)
    branches = {p: functools.partial(run, c) for p, c in per_platform.items()}
    return jax.lax.platform_dependent(default=functools.partial(run, default), **branches)


def pallas_table(interpreted_elsewhere: str) -> tuple[dict, tuple[str, bool]]:
    """({lowering platform: (target, interpret)}, (target, interpret) for every other platform).

    Each listed platform compiles its native target; elsewhere the `interpreted_elsewhere` body
    runs in interpret mode."""
    if interpreted_elsewhere not in TARGETS:
        raise ValueError(f"unknown Pallas target {interpreted_elsewhere!r}; expected one of "
                         f"{TARGETS}")
    return ({p: (t, False) for p, t in NATIVE_TARGETS.items()}, (interpreted_elsewhere, True))


def by_pallas_target(run: Callable[[str, bool], Any], *, interpreted_elsewhere: str,
                     interpret: bool | None = None):
    """run(target, interpret) for the platform the program is lowered for (`pallas_table`).

    `interpret`, when not None, replaces the table's interpret flag on every platform."""
    table, other = pallas_table(interpreted_elsewhere)

    def one(choice):
        target, interpreted = choice
        return run(target, interpreted if interpret is None else bool(interpret))
    return by_lowering_platform(one, table, other)
