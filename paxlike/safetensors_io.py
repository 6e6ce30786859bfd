"""The safetensors file format, written and read one tensor at a time.

A file is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}} and the tensors' bytes back to back. The
header needs only names, shapes and dtypes, so a writer that knows them up front can stream each
tensor's bytes as it is produced, and a reader can read one tensor without the others: Hugging
Face conversion then holds one tensor in memory at a time (paxlike/hf.py). numpy and ml_dtypes
(for bfloat16) are all it needs.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from paxlike.errors import UserError

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F16": np.dtype(np.float16), "F64": np.dtype(np.float64)}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_plan(tensors: list[tuple[str, tuple[int, ...], np.dtype]],
               max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
    """The tensors split, in order, into files of at most `max_shard_bytes` (a larger tensor gets
    a file of its own)."""
    shards, size = [[]], 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    return shards


def write_sharded(directory: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
                  produce: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int,
                  metadata: dict[str, str]) -> list[str]:
    """Writes the tensors (declared in `tensors`; their arrays come from `produce` in that order,
    one at a time) as Hugging Face names them: model.safetensors, or model-0000i-of-0000n
    .safetensors files plus model.safetensors.index.json. Returns the files written."""
    shards = shard_plan(tensors, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    arrays = iter(produce)
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        header, offset = {"__metadata__": metadata}, 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        total += offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)        # the format aligns the data to 8 bytes
        with open(os.path.join(directory, file_name), "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for name, shape, dtype in shard:
                produced_name, array = next(arrays)
                if produced_name != name or array.shape != tuple(shape) or array.dtype != dtype:
                    raise ValueError(f"expected {name} {tuple(shape)} {dtype}, got "
                                     f"{produced_name} {array.shape} {array.dtype}")
                f.write(np.ascontiguousarray(array).tobytes())
    if len(shards) > 1:
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + ([INDEX_FILE] if len(shards) > 1 else [])


class Reader:
    """The tensors of a Hugging Face model directory (one model.safetensors, or the shards its
    index names), each read on request."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise UserError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}: not a Hugging "
                            f"Face model saved with safetensors (save_pretrained writes them)")
        self.entries: dict[str, tuple[str, dict, int]] = {}
        for file_name in files:
            path = os.path.join(directory, file_name)
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                if entry["dtype"] not in DTYPES:
                    raise UserError(f"{path}: tensor {name} has dtype {entry['dtype']}; "
                                    f"paxlike reads {', '.join(DTYPES)}")
                self.entries[name] = (path, entry, 8 + length)

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> np.ndarray:
        path, entry, data_start = self.entries[name]
        begin, end = entry["data_offsets"]
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)
