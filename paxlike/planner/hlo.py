"""What a compiled program really does: collectives and their bytes, read from the optimized HLO.

The compilers rewrite collectives freely: TPU runs an FSDP all-gather feeding a matmul as a loop
of collective-permutes ("windowed einsum") or as an all-reduce of a zero-padded buffer, splits
one collective into several "async collective fusion" pieces (one channel id: counted once), and
the CPU backend emits all-reduce where TPU emits reduce-scatter. Op counts are therefore
backend-specific. Two figures are reported per kind:

  volume  the full buffer each collective gathers / reduces / permutes (gathered output,
          unreduced input, permuted operand): the same for every rewrite above (a windowed
          ring permutes g+1 chunks of 1/g), so this is what the cost model's prediction is
          checked against;
  bytes   what each device sends on a ring: all-gather and reduce-scatter volume × (g-1)/g,
          all-reduce 2 × volume × (g-1)/g, all-to-all volume × (g-1)/g, permute its operand;
          a ragged all-to-all (TPU expert parallelism) the smaller of its input and output
          buffers × (g-1)/g (its traffic depends on the routing: this is the average);

where g is the replica-group size. Ops inside loops are multiplied by the loop's trip count (the
CPU backend states it; on TPU it is read from the condition `i < N` and the counter's step), and
ops inside fusions / calls by how often those run.

Across TPU slices the compiler lowers the DCN part of a collective to a host-transfer `send` /
`recv` pair handled by the "megascale" runtime, not to a collective op: its kind is the
`_xla_megascale_transfer_type` attribute (ONE_TO_ONE: a collective-permute, e.g. a pipeline's
`ppermute` between slices; ALL_GATHER, ALL_REDUCE, ...). Each `send` is counted as one collective
of that kind with `"dcn": True` (its `recv` is the same transfer): volume the sent operand (the
received buffer for an all-gather), group the slices named in `_xla_megascale_target`
("{1,2}x{0:3}": slices 1 and 2, chips 0-3 of each; ONE_TO_ONE pairs: 2).
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
         "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|"
                    r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_COLLECTIVE = re.compile(r"^(" + "|".join(KINDS) + r")(-start)?$")
# DCN transfers between TPU slices (module docstring): megascale type -> collective kind.
_MEGASCALE = {"ONE_TO_ONE": "collective-permute", "ALL_GATHER": "all-gather",
              "ALL_REDUCE": "all-reduce", "REDUCE_SCATTER": "reduce-scatter",
              "ALL_TO_ALL": "all-to-all"}
_MEGASCALE_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def _shapes(text: str) -> list[float]:
    """Byte sizes of the array shapes in a type string (a tuple gives several)."""
    sizes = []
    for dtype, dims in _SHAPE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        sizes.append(n * _DTYPE_BYTES[dtype])
    return sizes


def _group_size(attrs: str, num_devices: int) -> int:
    """Replica-group size from any of the three printed forms."""
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        names = re.findall(r"'(\w+)'", m.group(2))
        return math.prod(int(sizes[n]) for n in names) if names else 1
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs):
        return int(m.group(2))
    if m := re.search(r"replica_groups=\{\{([^}]*)\}", attrs):
        return len(m.group(1).split(","))
    if "source_target_pairs" in attrs:
        return 2
    return num_devices  # empty groups: all devices


def group_axes(attrs: str) -> tuple[str, ...] | None:
    """The mesh axes of a collective's replica groups when the compiler prints them by name
    (XLA:CPU's `replica_groups=mesh[...] {'expert'}`); None in the iota / list forms."""
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        if any(re.fullmatch(r"axis_\d+", n) for n in sizes):   # an anonymous mesh
            return None
        return tuple(n for n in re.findall(r"'(\w+)'", m.group(2)) if int(sizes[n]) > 1)
    return None


def _parse(text: str):
    """{computation: [(name, type, opcode, rest)]}, and the entry computation's name."""
    comps: dict[str, list] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        # A computation ends at a line that is only "}" (a Mosaic kernel's backend_config can
        # span lines, one of them starting "}}, metadata=...").
        if line.rstrip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(m.groups())
    return comps, entry


def _constants(instrs: list) -> dict[str, int]:
    out = {}
    for name, typ, op, rest in instrs:
        if op == "constant" and (m := re.match(r"\s*(-?\d+)\)", rest)):
            out[name] = int(m.group(1))
    return out


def _trip_count(cond: list, body: list) -> int:
    """Iterations of a loop whose condition is `i < N` and whose body adds a constant step to i
    (the forms XLA gives scans and windowed-einsum loops); 1 if not recognised."""
    limit, index = None, None
    constants = _constants(cond)
    gtes = {name: re.search(r"index=(\d+)", rest) for name, typ, op, rest in cond
            if op == "get-tuple-element"}
    for name, typ, op, rest in cond:
        # CPU wraps the compare in a loop fusion (`wrapped_compare`); TPU prints it plainly.
        if (op == "compare" and "direction=LT" in rest) or (op == "fusion" and "compare" in rest):
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            for operand in operands:
                if operand in constants:
                    limit = constants[operand]
                elif gtes.get(operand):
                    index = gtes[operand].group(1)
    if limit is None:
        return 1
    step = 1
    root = body[-1] if body else None      # XLA prints the ROOT tuple last
    if index is not None and root and root[2] == "tuple":
        operands = re.findall(r"%([\w.\-]+)", root[3])
        nxt = operands[int(index)] if int(index) < len(operands) else None
        constants = _constants(body)
        for name, typ, op, rest in body:
            if name == nxt and op == "add":
                found = [constants[o] for o in re.findall(r"%([\w.\-]+)", rest.split(")")[0])
                         if o in constants]
                step = found[0] if found else 1
    return max(-(-limit // max(step, 1)), 1)


def computation_runs(hlo_text: str) -> tuple[dict, collections.Counter, set]:
    """(the program's computations {name: [(name, type, op, rest)]}; how many times each runs per
    step: loop bodies times their trip counts, fusions and calls once per call, each of a
    switch's N branches 1/N per call; the computations that are the body of a fusion)."""
    comps, entry = _parse(hlo_text)
    edges = collections.defaultdict(list)  # caller -> [(callee, times per call)]
    fused = set()                          # computations that are the body of a fusion
    for comp, instrs in comps.items():
        for name, typ, op, rest in instrs:
            if op == "fusion" and (called := re.search(r"calls=%?([\w.\-]+)", rest)):
                fused.add(called.group(1))
            trips = 1
            if op == "while":
                cond = re.search(r"condition=%?([\w.\-]+)", rest)
                body = re.search(r"body=%?([\w.\-]+)", rest)
                known = re.search(r'known_trip_count":\{"n":"(\d+)"', rest)
                if known:   # the CPU backend states it
                    trips = int(known.group(1))
                elif cond and body:
                    trips = _trip_count(comps.get(cond.group(1), []), comps.get(body.group(1), []))
            for key, targets in _CALLS.findall(rest):
                names = [t for t in re.findall(r"%?([\w.\-]+)", targets) if t in comps]
                for target in names:
                    # One branch of a `switch` runs per call: each counts as its expected share
                    # (NoLoCo draws its peer matching uniformly: paxlike/outer.py).
                    times = (trips if key == "body" else
                             1 / len(names) if key == "branch_computations" else 1)
                    edges[comp].append((target, times))
    # Executions per computation: the call graph is a DAG, so walk it in topological order.
    indegree = collections.Counter(t for callees in edges.values() for t, _ in callees)
    runs = collections.Counter({entry: 1})
    ready = [c for c in comps if indegree[c] == 0]
    while ready:
        comp = ready.pop()
        for target, times in edges.get(comp, ()):
            runs[target] += runs[comp] * times
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
    return comps, runs, fused


def collective_ops(hlo_text: str, num_devices: int) -> list[dict]:
    """Every collective of the program: kind, group size, executions per step, bytes sent per
    device per execution, and the jax op it came from."""
    comps, runs, fused = computation_runs(hlo_text)
    ops = []
    types = {comp: {name: typ for name, typ, op, rest in instrs} for comp, instrs in comps.items()}
    for comp, instrs in comps.items():
        if not runs[comp]:
            continue
        recv_sizes = {re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', rest).group(1):
                      _shapes(typ) for name, typ, op, rest in instrs
                      if op == "recv" and "_xla_host_transfer_rendezvous" in rest}
        for name, typ, op, rest in instrs:
            if op == "send" and (mega := _MEGASCALE_TYPE.search(rest)):
                ops.append(_megascale(typ, rest, mega.group(1), runs[comp], recv_sizes))
                continue
            m = _COLLECTIVE.match(op)
            if not m:
                continue
            kind = m.group(1)
            sizes = _shapes(typ)
            if not sizes:
                continue
            g = _group_size(rest, num_devices)
            if g <= 1:   # a group of one device (e.g. a shard_map psum over size-1 axes): no traffic
                continue
            # `full`: the whole buffer (gathered output, unreduced input, permuted operand).
            if kind == "ragged-all-to-all":
                # Operands (input, output buffer, 4 offset / size vectors) and the output buffer
                # are both sized for the worst case on one side: the input holds every row this
                # device may send, the output every row it may receive. Rows sent = rows
                # received over the group, so the smaller buffer is what a device moves on
                # average: exact for the sender of a dispatch (it sends all its rows) and for
                # the receiver of the return trip.
                if m.group(2):   # async start: ((input, output, 4 x offsets), output, ...)
                    full = min(sizes[0], sizes[1])
                else:
                    names = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
                    operand = _shapes(types[comp].get(names[0], "")) if names else []
                    full = min(sizes[0], operand[0]) if operand else sizes[0]
            elif m.group(2):  # async start: a tuple of (operands, outputs[, scratch])
                full = sizes[0] if kind == "collective-permute" else (
                    max(sizes) if kind in ("all-gather", "reduce-scatter") else sum(sizes) / 2)
            else:
                full = sum(sizes) * (g if kind == "reduce-scatter" else 1)
            if kind == "collective-permute":
                sent = full
            elif kind == "all-reduce":
                sent = 2 * full * (g - 1) / g
            else:
                sent = full * (g - 1) / g
            source = re.search(r'op_name="([^"]*)"', rest)
            channel = re.search(r"channel_id=(\d+)", rest)
            ops.append({"kind": kind, "group": g, "axes": group_axes(rest), "runs": runs[comp],
                        "bytes": sent, "volume": full, "dcn": False,
                        "shape": typ.split("{")[0], "op_name": source.group(1) if source else "",
                        "channel": int(channel.group(1)) if channel and comp in fused else None})
    # TPU splits one collective into several "async collective fusion" pieces that share its
    # channel id: they are one transfer, counted once. Only pieces inside fusions are merged:
    # XLA:CPU gives distinct collectives of one kind the same channel id (every all-to-all of
    # an expert-parallel step has channel_id=1).
    merged: dict = {}
    for op in ops:
        key = (op["kind"], op["channel"]) if op["channel"] is not None else id(op)
        if key not in merged or op["runs"] > merged[key]["runs"]:
            merged[key] = op
    return list(merged.values())


def _megascale(typ: str, rest: str, transfer: str, runs: int, recv_sizes: dict) -> dict:
    """One DCN transfer between TPU slices (a `send` of the megascale runtime) as a collective."""
    kind = _MEGASCALE.get(transfer, transfer.lower())
    sent = _shapes(typ)[0]                      # (operand, context, token)
    rendezvous = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', rest)
    received = recv_sizes.get(rendezvous.group(1) if rendezvous else None, [sent])[0]
    target = re.search(r'_xla_megascale_target="\{([^}]*)\}', rest)
    if kind == "collective-permute":
        g = 2
    elif kind == "all-gather" and sent:
        g = max(round(received / sent), 2)
    else:
        g = max(len(target.group(1).split(",")), 2) if target else 2
    full = received if kind == "all-gather" else sent * (g if kind == "reduce-scatter" else 1)
    per_device = {"collective-permute": full, "all-reduce": 2 * full * (g - 1) / g}
    source = re.search(r'op_name="([^"]*)"', rest)
    return {"kind": kind, "group": g, "axes": None, "runs": runs,
            "bytes": per_device.get(kind, full * (g - 1) / g), "volume": full, "dcn": True,
            "shape": typ.split("{")[0], "op_name": source.group(1) if source else "",
            "channel": None}


def volume_by_axes(hlo_text: str, num_devices: int) -> dict[str, float]:
    """Full-buffer volume per step by the mesh axes of the replica group, "data+expert" style
    (in mesh order, as the compiler prints them; "?" where the groups are not named)."""
    out: dict[str, float] = collections.defaultdict(float)
    for op in collective_ops(hlo_text, num_devices):
        key = "?" if op["axes"] is None else "+".join(op["axes"])
        out[key] += op["runs"] * op["volume"]
    return dict(out)


def collectives(hlo_text: str, num_devices: int) -> dict:
    """{kind: {"count": executions per step, "bytes": bytes sent per device per step,
    "volume": bytes of the full buffers per step, "dcn_volume": the part of the volume moved
    between TPU slices by the megascale runtime}}."""
    out = {k: {"count": 0, "bytes": 0.0, "volume": 0.0, "dcn_volume": 0.0} for k in KINDS}
    for op in collective_ops(hlo_text, num_devices):
        out[op["kind"]]["count"] += op["runs"]
        out[op["kind"]]["bytes"] += op["runs"] * op["bytes"]
        out[op["kind"]]["volume"] += op["runs"] * op["volume"]
        if op["dcn"]:
            out[op["kind"]]["dcn_volume"] += op["runs"] * op["volume"]
    return out
