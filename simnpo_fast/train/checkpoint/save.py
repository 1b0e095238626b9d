"""Writing a checkpoint atomically: ``step_N.tmp`` -> files -> manifest -> marker -> rename to ``step_N``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Dict, Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from ...distributed import barrier, broadcast_object, gather_objects, rank
from .files import (MANIFEST, MANIFEST_FORMAT, MARKER, STATE_FILE, fsync_dir, fsync_write, list_checkpoints,
                    rank_share, rng_state, sha256_file, torch_save)


def save_checkpoint(root: str, step: int, model, optimizer, *, state: dict, tensors: Optional[Dict] = None,
                    keep: int = 0, run_id: Optional[str] = None, files: Optional[Dict[str, str]] = None) -> str:
    """Collective: every rank calls it. Writes ``step_<step>`` (model, optimizer, RNG, ``state`` as JSON,
    rank-0 ``tensors``, extra text ``files``), its manifest and marker, renames it into place, points
    ``latest`` at it and keeps the newest ``keep`` checkpoints (0: all). Returns the final folder."""
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    if rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    _write_contents(tmp, model, optimizer, dict(state, run_id=run_id), tensors, files)
    barrier()
    entries = _hash_files(tmp)
    if rank() == 0:
        _write_manifest(tmp, step, run_id, entries)
        _publish(root, name, tmp, final)
        if keep and keep > 0:
            for _, path in list_checkpoints(root)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def _write_contents(tmp: str, model, optimizer, state: dict, tensors: Optional[Dict],
                    files: Optional[Dict[str, str]]) -> None:
    """DCP shards of model + optimizer and this rank's RNG; on rank 0 also the state, tensors and files."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch_save(rng_state(), os.path.join(tmp, f"rng_rank{rank()}.pt"))
    if rank() == 0:
        fsync_write(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1))
        torch_save(dict(tensors or {}), os.path.join(tmp, "tensors.pt"))
        for fname, text in (files or {}).items():
            fsync_write(os.path.join(tmp, fname), text)


def _hash_files(tmp: str) -> dict:
    """``{file: {size, sha256}}`` of every file of ``tmp``; each rank hashes its share, every rank gets all."""
    names = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n))) if rank() == 0 else None
    names = broadcast_object(names)
    mine = {n: {"size": os.path.getsize(os.path.join(tmp, n)), "sha256": sha256_file(os.path.join(tmp, n))}
            for n in rank_share(names)}
    entries = {}
    for part in gather_objects(mine):
        entries.update(part)
    return entries


def _write_manifest(tmp: str, step: int, run_id: Optional[str], entries: dict) -> None:
    manifest = {"format": MANIFEST_FORMAT, "run_id": run_id, "step": step,
                "files": {n: entries[n] for n in sorted(entries)}}
    mbytes = json.dumps(manifest, indent=1).encode("utf-8")
    fsync_write(os.path.join(tmp, MANIFEST), mbytes)
    fsync_write(os.path.join(tmp, MARKER),
                json.dumps({"step": step, "manifest_sha256": hashlib.sha256(mbytes).hexdigest()}))
    fsync_dir(tmp)


def _publish(root: str, name: str, tmp: str, final: str) -> None:
    """Rank 0: rename ``tmp`` to ``final`` (an earlier folder of the same step is replaced only after the
    rename) and point ``latest`` at it."""
    old = None
    if os.path.exists(final):  # re-saving a step (e.g. the final checkpoint of a resumed, finished run)
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_write(os.path.join(root, "latest.tmp"), name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    fsync_dir(root)
    if old:
        shutil.rmtree(old, ignore_errors=True)
