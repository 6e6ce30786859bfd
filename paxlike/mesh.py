"""Where mesh axes become devices.

A mesh has the six axes below, outermost (slowest links) to innermost (fastest). Their sizes come
from the config (`mesh.<axis>`, one of them may be -1 for "all remaining devices"). For a fleet of
several TPU slices or GPU nodes, `mesh.dcn.<axis>` says how much of an axis crosses the slow
data-centre network; the rest stays on the fast interconnect inside one slice or node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from paxlike.devices import dcn_granules
from paxlike.errors import UserError

MESH_AXES = ("data", "pipeline", "fsdp", "expert", "context", "tensor")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Returns {axis: size} for all six axes with -1 resolved; raises UserError when invalid."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise UserError(f"unknown mesh axis {unknown}; the mesh axes are {', '.join(MESH_AXES)}")
    resolved = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    wildcards = [a for a, s in resolved.items() if s == -1]
    bad = [f"mesh.{a}={s}" for a, s in resolved.items() if s == 0 or s < -1]
    if bad:
        raise UserError(f"invalid mesh size {', '.join(bad)}: sizes are positive, or -1 for 'the rest'")
    if len(wildcards) > 1:
        raise UserError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in wildcards)}")
    fixed = math.prod(s for s in resolved.values() if s != -1)
    if wildcards:
        if num_devices % fixed:
            raise UserError(
                f"mesh axes other than mesh.{wildcards[0]} multiply to {fixed}, which does not divide "
                f"the {num_devices} devices; change the mesh sizes")
        resolved[wildcards[0]] = num_devices // fixed
    product = math.prod(resolved.values())
    if product != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in resolved.items() if s != 1) or "all 1"
        raise UserError(
            f"mesh sizes multiply to {product} ({shape}) but there are {num_devices} device(s); make "
            f"the product equal {num_devices} (or set one axis to -1)")
    return resolved


def build_mesh(sizes: Mapping[str, int], dcn: Mapping[str, int] | None = None,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the device mesh with Auto axis types (GSPMD propagation plus our constraints).

    `sizes` are the total sizes per axis; `dcn` the part of each that spans slices or nodes.
    Devices are arranged in physical order (torus-aware on TPU) so that inner axes map onto the
    fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    total = resolve_axis_sizes(sizes, len(devices))
    dcn = {axis: int((dcn or {}).get(axis, 1)) for axis in MESH_AXES}
    for axis, d in dcn.items():
        if d < 1 or total[axis] % d:
            raise UserError(f"mesh.dcn.{axis}={d} must be >= 1 and divide mesh.{axis}={total[axis]}")
    num_dcn = math.prod(dcn.values())
    shape = tuple(total[a] for a in MESH_AXES)
    if num_dcn == 1:
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        granules, by_process = dcn_granules(devices)
        if granules != num_dcn:
            raise UserError(
                f"mesh.dcn sizes multiply to {num_dcn} but the devices form {granules} "
                f"{'processes' if by_process else 'slices'}; make them equal")
        ici = tuple(total[a] // dcn[a] for a in MESH_AXES)
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici, tuple(dcn[a] for a in MESH_AXES), devices, process_is_granule=by_process,
            allow_split_physical_axes=True)
    return Mesh(np.asarray(device_array), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    """A short human-readable mesh description, e.g. 'data=2 fsdp=2 tensor=2 (8 cpu devices)'."""
    parts = [f"{a}={s}" for a, s in mesh.shape.items() if s > 1] or ["single device"]
    platform = mesh.devices.flat[0].platform
    return f"{' '.join(parts)} ({mesh.size} {platform} devices)"
