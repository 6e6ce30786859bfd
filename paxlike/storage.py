"""One file-system layer for a run's workdir: local paths, and `gs://BUCKET/...` (also the other
remote schemes etils.epath knows: s3://, az://, hf://) through `etils.epath`.

Local paths behave exactly as plain `os` calls: directories are made, files are replaced
atomically (a temporary file renamed over the old one). An object store has neither directories
nor renames, but a single object write is atomic (the new object replaces the old one whole, or
nothing changes), so on a remote path:

- `makedirs` does nothing (creating "directories" would at most create a bucket by mistake),
- `write_atomically` is one object write,
- `move_tree` copies every object and then deletes the source (what a rename is there).

Checkpoints go through orbax, which in orbax-checkpoint 0.12.x builds a tensorstore kvstore for
local paths and gs:// only: `check_workdir` refuses the other remote schemes for a training run.
Using gs:// needs `pip install 'paxlike[gcs]'` (gcsfs for etils.epath, google-cloud-storage for
orbax's bucket look-ups); credentials are the usual application-default ones.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import shutil

from etils import epath

from paxlike.errors import UserError

# etils.epath's URI schemes (etils/epath/gpath.py), each with the fsspec package it needs.
REMOTE_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
# Where orbax can write checkpoints (orbax/checkpoint/_src/serialization/tensorstore_utils.py).
CHECKPOINT_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path) -> str | None:
    """'gs' for 'gs://bucket/x', None for a local path."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_local(path) -> bool:
    return scheme(path) is None


def check_workdir(workdir: str, what: str = "--workdir") -> None:
    """Refuses (UserError) a location a training run cannot use: an unknown scheme, a scheme orbax
    cannot checkpoint to, or a scheme whose file-system package is not installed."""
    s = scheme(workdir)
    if s is None:
        return
    what = f"{what}={workdir}" if what.startswith("--") else f"{what} {workdir}"
    if s not in REMOTE_SCHEMES or s not in CHECKPOINT_SCHEMES:
        supported = "a local path or gs://BUCKET/PATH"
        why = ("orbax checkpoints support local paths and gs:// only" if s in REMOTE_SCHEMES
               else f"{s}:// is not a file system paxlike knows")
        raise UserError(f"{what}: {why}; use {supported}")
    # epath reaches gs:// through gcsfs (or TensorFlow's gfile when TensorFlow is installed);
    # orbax lists checkpoint steps on gs:// with google-cloud-storage.
    needed = {"google.cloud.storage": "google-cloud-storage"}
    if not (s == "gs" and installed("tensorflow")):
        needed[REMOTE_SCHEMES[s]] = REMOTE_SCHEMES[s]
    missing = sorted(package for module, package in needed.items() if not installed(module))
    if missing:
        raise UserError(f"{what} needs {' and '.join(missing)}, which are not "
                        f"installed: pip install 'paxlike[gcs]'")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:   # a parent package (google.cloud) is missing
        return False


def absolute(p: str) -> str:
    """An absolute local path (os.path.abspath), or the remote path without a trailing slash."""
    p = os.fspath(p)
    if is_local(p):
        return os.path.abspath(p)
    head, rest = p.split("://", 1)
    return f"{head}://{posixpath.normpath(rest)}" if rest.strip("/") else p


def join(base: str, *parts: str) -> str:
    base = os.fspath(base)
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def basename(p: str) -> str:
    p = os.fspath(p)
    return os.path.basename(p) if is_local(p) else posixpath.basename(p.rstrip("/"))


def dirname(p: str) -> str:
    p = os.fspath(p)
    return os.path.dirname(p) if is_local(p) else posixpath.dirname(p.rstrip("/"))


def exists(p) -> bool:
    return os.path.exists(p) if is_local(p) else epath.Path(p).exists()


def isdir(p) -> bool:
    return os.path.isdir(p) if is_local(p) else epath.Path(p).is_dir()


def listdir(p) -> list[str]:
    """Names in directory `p`; [] when it does not exist."""
    if is_local(p):
        return os.listdir(p) if os.path.isdir(p) else []
    directory = epath.Path(p)
    return [c.name for c in directory.iterdir()] if directory.is_dir() else []


def makedirs(p) -> None:
    """os.makedirs(p, exist_ok=True) for a local path; nothing for an object store."""
    if is_local(p):
        os.makedirs(p, exist_ok=True)


def read_bytes(p) -> bytes:
    if is_local(p):
        with open(p, "rb") as f:
            return f.read()
    return epath.Path(p).read_bytes()


def read_text(p) -> str:
    return read_bytes(p).decode()


def write_atomically(p, data: str | bytes, *, fsync: bool = False) -> None:
    """Replaces file `p` with `data` whole: a local temporary file `p.tmp` renamed over `p`, or one
    object write (atomic on an object store)."""
    raw = data.encode() if isinstance(data, str) else data
    if not is_local(p):
        epath.Path(p).write_bytes(raw)
        return
    tmp = os.fspath(p) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(raw)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, p)


def rmtree(p) -> None:
    if is_local(p):
        shutil.rmtree(p)
    else:
        epath.Path(p).rmtree()


def move_tree(src, dst) -> None:
    """Moves directory `src` to `dst` (which must not exist): a rename on a local file system;
    on an object store every object is copied, then the source deleted."""
    if is_local(src):
        os.rename(src, dst)
        return
    _copy_tree(epath.Path(src), epath.Path(dst))
    epath.Path(src).rmtree()


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    for child in src.iterdir():
        if child.is_dir():
            _copy_tree(child, dst / child.name)
        else:
            child.copy(dst / child.name)
