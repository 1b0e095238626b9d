"""The checkpoint folder's layout and its file primitives: durable writes, hashing, RNG state, listing."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import shutil
from typing import List, Optional

import torch

from ...distributed import rank, world_size
from ...errors import exception_chain

STEP_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE_FILE = "trainer_state.json"
METADATA_FILE = ".metadata"
REJECTED_SUFFIX = ".rejected"
MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


def fsync_write(path: str, data) -> None:
    """Write ``data`` (str or bytes) to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """fsync a folder (its entries), ignoring file systems that refuse it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def torch_save(obj, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    fsync_write(path, buf.getvalue())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def rank_share(names: List[str]) -> List[str]:
    """This rank's share of a sorted file list (rank r hashes files r, r + W, ...)."""
    return sorted(names)[rank()::world_size()]


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_to_tuple(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(root: str, *, complete_only: bool = True):
    """``[(step, path)]`` of the ``step_N`` folders in increasing step order: those with a ``COMPLETE`` marker
    (not yet verified), or with ``complete_only=False`` every one. A folder without its marker was damaged after
    it was published (a save writes the marker before the rename): resume rejects it by name, and neither a
    save of the same step nor the rotation ever deletes it."""
    if not os.path.isdir(root):
        return []
    out = []
    for n in os.listdir(root):
        m = STEP_RE.match(n)
        p = os.path.join(root, n)
        if m and os.path.isdir(p) and (not complete_only or os.path.isfile(os.path.join(p, MARKER))):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete (marked, not yet verified) checkpoint folder, or None. The folder is scanned: the
    ``latest`` pointer can lag behind by one checkpoint after a kill between the rename and its update."""
    cks = list_checkpoints(root)
    return cks[-1][1] if cks else None


def move_aside(path: str, reason: str) -> str:
    """Rank 0: rename a rejected checkpoint to ``<path>.rejected[-N]`` with a ``REJECTED`` note; returns the
    new path. Nothing is deleted."""
    dest = path + REJECTED_SUFFIX
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}{REJECTED_SUFFIX}-{n}"
    os.rename(path, dest)
    try:
        fsync_write(os.path.join(dest, "REJECTED"), reason + "\n")
    except OSError:
        pass
    return dest


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_LOW_SPACE = 64 << 20


def failure_cause(exc: BaseException, where: Optional[str] = None) -> str:
    """One line for a failed checkpoint save or load: the innermost informative error (an ``OSError`` by its
    strerror and file first), and, when the file system of ``where`` is full or the error says so, how many
    bytes are free there."""
    errors = list(exception_chain(exc))
    os_err = next((e for e in errors if isinstance(e, OSError) and e.errno), None)
    if os_err is not None:
        text = f"{os_err.strerror or type(os_err).__name__}" + (f" ({os_err.filename})" if os_err.filename else "")
    else:
        inner = errors[1] if len(errors) > 1 and getattr(exc, "failures", None) else exc
        text = f"{type(inner).__name__}: {' '.join(str(inner).split())[:600]}"
    full = os_err is not None and os_err.errno in _DISK_FULL
    if where is not None:
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        if free is not None and (full or free < _LOW_SPACE):
            text += f"; the file system of {where} is full ({free} bytes free)"
    return text
