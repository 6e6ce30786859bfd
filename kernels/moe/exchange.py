"""Ragged all-to-all for expert parallelism, and a padded equivalent for backends without it.

`jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
recv_sizes, *, axis_name)`: the K = len(send_sizes) slices of `operand` are split evenly over
the axis (slice i goes to device i // (K / axis_size)); slice i is
operand[input_offsets[i] : +send_sizes[i]] and lands in the receiver's copy of `output` at
output_offsets[i] -- a SENDER-side offset. recv_sizes[i] is the size of the slice received from
the same pairing. Output rows that nothing lands on keep the value of `output`.

XLA:CPU (and so the emulated-device tests) has no ragged all-to-all, so
`padded_ragged_all_to_all` has the same signature and result, built from a dense
`jax.lax.all_to_all` of a [K, S, ...] buffer with every slice padded to S rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EXCHANGES = ("auto", "ragged", "padded")


def padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                             recv_sizes, *, axis_name, pad_value=0.0,
                             max_slice_size: int | None = None):
    """`jax.lax.ragged_all_to_all` semantics from dense all-to-alls (module docstring).

    Each slice is copied into a row of a [K, S, ...] buffer, S = max_slice_size (default
    operand.shape[0], which no slice can exceed); slots past a slice's size hold `pad_value`
    (cast to operand's dtype). One all_to_all moves the buffer, one more moves output_offsets
    so that each receiver learns where every incoming slice belongs, and a scatter writes the
    first recv_sizes[i] rows of received slice i there; padding rows are dropped by the scatter
    and never reach `output`.

    max_slice_size: a static bound on every send size, to shrink the buffer when the caller
    knows one; rows of a slice past it are lost, so it must really be a bound.
    Costs K*S rows of traffic per device instead of the rows actually sent.
    """
    num_slices = input_offsets.shape[0]
    for name, a in (("input_offsets", input_offsets), ("send_sizes", send_sizes),
                    ("output_offsets", output_offsets), ("recv_sizes", recv_sizes)):
        if a.shape != (num_slices,):
            raise ValueError(f"{name} must be [K={num_slices}], got {a.shape}")
    if operand.shape[1:] != output.shape[1:]:
        raise ValueError(f"operand {operand.shape} and output {output.shape} must agree past "
                         f"the leading axis")
    size = max_slice_size if max_slice_size is not None else operand.shape[0]
    row = jnp.arange(size, dtype=input_offsets.dtype)

    # Gather each slice into its padded row; an index past the operand (a padding slot) reads
    # the fill value.
    src = jnp.where(row < send_sizes[:, None], input_offsets[:, None] + row, operand.shape[0])
    send = jnp.take(operand, src, axis=0, mode="fill", fill_value=pad_value)   # [K, S, ...]
    received = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)
    # Slice i of `received` came from device i // (K / axis_size); its offset in our output is
    # what that sender passed as output_offsets for us.
    landing = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dst = jnp.where(row < recv_sizes[:, None], landing[:, None] + row, output.shape[0])
    return output.at[dst].set(received, mode="drop")


def resolve_exchange(exchange: str, mesh) -> str:
    """"ragged" or "padded": "auto" is ragged exactly when the mesh's devices are TPUs (the
    backends that implement ragged all-to-all; XLA:CPU does not)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown exchange {exchange!r}; expected one of {EXCHANGES}")
    if exchange != "auto":
        return exchange
    devices = getattr(mesh, "devices", None)
    if devices is None:
        raise ValueError("exchange='auto' needs a concrete Mesh; pass exchange='ragged' or "
                         "'padded' with an abstract mesh")
    return "ragged" if devices.flat[0].platform == "tpu" else "padded"


def ragged_exchange(kind: str, operand, output, input_offsets, send_sizes, output_offsets,
                    recv_sizes, *, axis_name, pad_value=0.0, max_slice_size=None):
    """The ragged all-to-all of `kind` ("ragged": the XLA collective; "padded": the dense
    emulation). pad_value and max_slice_size only matter to the padded one."""
    if kind == "ragged":
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                         output_offsets, recv_sizes, axis_name=axis_name)
    return padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                    recv_sizes, axis_name=axis_name, pad_value=pad_value,
                                    max_slice_size=max_slice_size)
