"""Verifying a checkpoint against its manifest before use, and loading a verified one."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ...distributed import broadcast_object, gather_objects, rank
from ...errors import CheckpointError
from .files import (MANIFEST, MARKER, METADATA_FILE, STATE_FILE, failure_cause, rank_share, set_rng_state,
                    sha256_file)
from .safe_read import SafeFileSystemReader, SafeLoadPlanner, check_storage_paths, read_dcp_metadata


@dataclass
class Verification:
    path: str
    ok: bool
    reason: str = ""
    state: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def _read_manifest(path: str, run_id: Optional[str]) -> dict:
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise ValueError(f"the {MARKER} marker is missing (a save writes it before publishing the folder: the "
                         "folder was damaged or copied incompletely since)")
    try:
        with open(os.path.join(path, MARKER), "rb") as f:
            marker = json.loads(f.read().decode("utf-8"))
        if not isinstance(marker, dict) or "manifest_sha256" not in marker:
            raise ValueError
    except (OSError, ValueError):
        raise ValueError(f"{MARKER} is not a manifest marker (a checkpoint of an older simnpo-fast, or damaged): "
                         "it cannot be verified") from None
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ValueError(f"{MANIFEST} is missing")
    with open(mpath, "rb") as f:
        mbytes = f.read()
    if hashlib.sha256(mbytes).hexdigest() != marker["manifest_sha256"]:
        raise ValueError(f"{MANIFEST} does not match the hash recorded in {MARKER}")
    manifest = json.loads(mbytes.decode("utf-8"))
    if run_id is not None and manifest.get("run_id") != run_id:
        raise ValueError(f"it belongs to run {manifest.get('run_id')}, not to this folder's run {run_id}")
    files = manifest.get("files")
    if not isinstance(files, dict) or METADATA_FILE not in files or STATE_FILE not in files:
        raise ValueError(f"{MANIFEST} does not list {METADATA_FILE} and {STATE_FILE}")
    for n, e in files.items():
        if os.path.basename(n) != n or n in (".", ".."):
            raise ValueError(f"{MANIFEST} names a path outside the folder: {n!r}")
        p = os.path.join(path, n)
        if not os.path.isfile(p):
            raise ValueError(f"{n} is missing")
        if os.path.getsize(p) != int(e["size"]):
            raise ValueError(f"{n} has {os.path.getsize(p)} bytes, the manifest says {e['size']} (truncated?)")
    return manifest


def _check_contents(path: str, manifest: dict) -> dict:
    """Rank 0, after the hashes matched: every file parses with the safe readers. Returns the trainer state."""
    files = manifest["files"]
    try:
        check_storage_paths(read_dcp_metadata(path), files)
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad checkpoint
        raise ValueError(f"{METADATA_FILE}: {e}") from None
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        int(state["step"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{STATE_FILE}: {type(e).__name__}: {e}") from None
    for n in files:
        if n.endswith(".pt"):
            try:
                torch.load(os.path.join(path, n), weights_only=True, map_location="cpu")
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{n}: {e}") from None
    return state


def verify_checkpoint(path: str, *, run_id: Optional[str] = None) -> Verification:
    """Collective. Check ``path`` against its manifest (see the package docstring); never raises for a bad
    checkpoint: returns ``Verification(ok=False, reason=...)`` naming the file."""
    def head():
        try:
            return True, _read_manifest(path, run_id)
        except Exception as e:  # noqa: BLE001
            return False, str(e)

    ok, manifest = broadcast_object(head() if rank() == 0 else None)
    if not ok:
        return Verification(path, False, manifest)
    bad = []
    for n in rank_share(list(manifest["files"])):
        try:
            if sha256_file(os.path.join(path, n)) != manifest["files"][n]["sha256"]:
                bad.append(n)
        except OSError as e:
            bad.append(f"{n} ({e.strerror})")
    bad = sorted(b for part in gather_objects(bad) for b in part)
    if bad:
        return Verification(path, False, f"checksum mismatch in {', '.join(bad)}", manifest=manifest)

    def contents():
        try:
            return True, _check_contents(path, manifest)
        except Exception as e:  # noqa: BLE001
            return False, str(e)

    ok, state = broadcast_object(contents() if rank() == 0 else None)
    if not ok:
        return Verification(path, False, state, manifest=manifest)
    return Verification(path, True, "", state=state, manifest=manifest)


def load_checkpoint(path: str, model, optimizer, *, manifest: Optional[dict] = None) -> Tuple[dict, dict]:
    """Collective. Restores model, optimizer and this rank's RNG from a checkpoint that
    :func:`verify_checkpoint` accepted (``manifest`` from its result; verified here when omitted); returns
    ``(trainer_state, tensors)``. Raises :class:`~simnpo_fast.errors.CheckpointError` naming the folder."""
    if manifest is None:
        v = verify_checkpoint(path)
        if not v.ok:
            raise CheckpointError(f"{path}: {v.reason}")
        manifest = v.manifest
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, storage_reader=SafeFileSystemReader(path, manifest["files"]), planner=SafeLoadPlanner())
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        tensors = torch.load(os.path.join(path, "tensors.pt"), weights_only=True, map_location="cpu")
        rng_file = os.path.join(path, f"rng_rank{rank()}.pt")
        if os.path.isfile(rng_file):  # absent when resuming with more ranks than were saved
            set_rng_state(torch.load(rng_file, weights_only=True))
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot be loaded into this run's model and optimizer: "
                              f"{failure_cause(e)}") from e
    return state, tensors
