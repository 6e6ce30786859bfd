"""Fleets as data: what the planner plans for.

A *device* is one accelerator chip (or one emulated CPU device): its memory, dense bf16 peak and
links (`paxlike.devices`, also the trainer's MFU denominator). A *fleet* is a number of identical
devices, grouped into *granules* (TPU slices or GPU nodes) joined by the slow data-centre network
(DCN); inside a granule devices talk over ICI (TPU) or NVLink (GPU).

Fleet names:
  v5p-128, v4-64      TPU v4 / v5p: the number counts TensorCores, two per chip (Google's naming),
                      so v5p-128 is 64 chips (topology 4x4x4)
  v5e-16, v6e-256     TPU v5e / v6e: one TensorCore per chip, so the number is chips
  2xv5p-256           2 slices of v5p-256 joined by DCN
  8xH100, 4x8xH100    GPUs: one node of 8, or 4 nodes of 8 (also H200, A100)
  cpu-8               8 emulated CPU devices of this machine (memory and speed measured)
"""

from __future__ import annotations

import dataclasses
import re

from paxlike.devices import DEVICES, DeviceSpec, cpu_device, dcn_granules, device_for_kind
from paxlike.errors import UserError


@dataclasses.dataclass(frozen=True)
class Fleet:
    name: str
    device: DeviceSpec
    granules: int             # slices / nodes, joined by DCN
    per_granule: int          # devices in each

    @property
    def num_devices(self) -> int:
        return self.granules * self.per_granule

    @property
    def torus(self) -> tuple[int, ...]:
        """Physical shape of one TPU slice (chips), e.g. (4, 4, 4); () for GPUs and CPU."""
        return tpu_torus(self.device, self.per_granule) if self.device.torus_dims else ()

    @property
    def aot_topology(self) -> str | None:
        """libtpu topology name for an ahead-of-time compile, e.g. 'v5p:4x4x4'."""
        if not self.device.aot_name:
            return None
        return f"{self.device.aot_name}:{'x'.join(map(str, self.torus))}"


def tpu_torus(device: DeviceSpec, chips: int) -> tuple[int, ...]:
    """The slice shape Google provisions for `chips` chips: powers of two, as cube-like as
    possible, larger dimensions last (2x2x1 for 4 v5p chips, 4x4x8 for 128, 8x16 for 128 v5e)."""
    if chips < 1 or chips & (chips - 1):
        raise UserError(f"a {device.name} slice has a power-of-two number of chips, not {chips}")
    dims = [1] * device.torus_dims
    remaining, i = chips, 0
    while remaining > 1:
        dims[i % len(dims)] *= 2
        remaining //= 2
        i += 1
    if device.torus_dims == 3 and chips == 4:   # v4-8 / v5p-8: one 2x2x1 board
        return (2, 2, 1)
    return tuple(sorted(dims))


_TPU_RE = re.compile(r"^(?:(\d+)x)?(v4|v5e|v5p|v6e)-(\d+)$")
_GPU_RE = re.compile(r"^(?:(\d+)x)?(\d+)x(H100|H200|A100)$")
_CPU_RE = re.compile(r"^cpu-(\d+)$")
_EXAMPLES = "v5p-128, v5e-16, 2xv5p-256 (slices), 8xH100, 4x8xH100 (nodes x GPUs), cpu-8"


def parse_fleet(name: str) -> Fleet:
    """Fleet from its name; UserError naming the accepted forms when malformed."""
    text = name.strip()
    if m := _TPU_RE.match(text):
        slices, kind, number = int(m.group(1) or 1), m.group(2), int(m.group(3))
        device = DEVICES[kind]
        if number % device.cores_per_chip:
            raise UserError(f"fleet {name!r}: {kind}-N counts TensorCores ({device.cores_per_chip} "
                            f"per chip), so N must be a multiple of {device.cores_per_chip}")
        chips = number // device.cores_per_chip
        if chips < 1 or chips > device.max_granule or chips & (chips - 1):
            raise UserError(f"fleet {name!r}: a {kind} slice has a power-of-two number of chips "
                            f"between 1 and {device.max_granule}, not {chips}")
        if slices < 1:
            raise UserError(f"fleet {name!r}: the number of slices must be >= 1")
        return Fleet(text, device, slices, chips)
    if m := _GPU_RE.match(text):
        nodes, per_node, kind = int(m.group(1) or 1), int(m.group(2)), m.group(3)
        if nodes < 1 or not 1 <= per_node <= DEVICES[kind].max_granule:
            raise UserError(f"fleet {name!r}: a node holds 1 to {DEVICES[kind].max_granule} "
                            f"{kind} GPUs and there is at least one node")
        return Fleet(text, DEVICES[kind], nodes, per_node)
    if m := _CPU_RE.match(text):
        n = int(m.group(1))
        if n < 1:
            raise UserError(f"fleet {name!r}: at least one CPU device")
        return Fleet(text, cpu_device(n), 1, n)
    raise UserError(f"unknown fleet name {name!r}; fleets look like {_EXAMPLES}")


def fleet_name(device: DeviceSpec, granules: int, per_granule: int) -> str:
    """The name `parse_fleet` reads back for this many devices."""
    if device.name == "cpu":
        return f"cpu-{per_granule}"
    if device.torus_dims:
        one = f"{device.name}-{per_granule * device.cores_per_chip}"
    else:
        one = f"{per_granule}x{device.name}"
    return one if granules == 1 else f"{granules}x{one}"


def larger_fleets(fleet: Fleet, limit: int = 65536):
    """Fleets of the same device kind, in increasing device count (for 'smallest that fits')."""
    device = fleet.device
    if device.name == "cpu":
        n = fleet.per_granule
        while n <= min(limit, 4096):
            n *= 2
            yield Fleet(fleet_name(device, 1, n), cpu_device(n), 1, n)
        return
    per = fleet.per_granule
    granules = fleet.granules
    while per * granules <= limit:
        # Grow a slice / node first, then add slices / nodes of the largest size.
        if per < device.max_granule and (per * 2 <= device.max_granule):
            per *= 2
        else:
            granules = granules * 2 if granules > 1 else 2
        if per * granules > limit:
            return
        yield Fleet(fleet_name(device, granules, per), device, granules, per)


def fleet_for_devices(devices) -> Fleet:
    """The fleet that a list of jax devices forms (slices detected from `slice_index`)."""
    devices = list(devices)
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return Fleet(f"cpu-{len(devices)}", cpu_device(len(devices)), 1, len(devices))
    spec = device_for_kind(kind)
    if spec is None:
        raise UserError(f"no fleet spec for device kind {kind!r}; known: "
                        f"{', '.join(k for d in DEVICES.values() for k in d.kinds)}")
    granules, by_process = dcn_granules(devices)
    if by_process and spec.torus_dims:
        granules = 1   # the hosts of one TPU slice share its ICI: one granule
    per = len(devices) // granules
    return Fleet(fleet_name(spec, granules, per), spec, granules, per)
