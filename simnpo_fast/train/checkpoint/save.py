"""Writing a checkpoint atomically: ``step_N.tmp`` -> files -> manifest -> marker -> rename to ``step_N``.

A failure anywhere (a full or read-only disk, a permission, torch's own ``CheckpointException``) reaches every
rank as one :class:`~simnpo_fast.errors.CheckpointError` naming the folder and the cause (each phase ends with
the ranks agreeing on it, so no rank waits at a collective for one that failed); the unfinished ``.tmp`` folder
is removed to give the disk back, and no published checkpoint is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Dict, Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from ...distributed import barrier, broadcast_object, gather_objects, on_rank0, rank
from ...errors import CheckpointError, RankZeroError, warn
from .files import (MANIFEST, MANIFEST_FORMAT, MARKER, STATE_FILE, failure_cause, fsync_dir, fsync_write,
                    list_checkpoints, move_aside, rank_share, rng_state, sha256_file, torch_save)


def save_checkpoint(root: str, step: int, model, optimizer, *, state: dict, tensors: Optional[Dict] = None,
                    keep: int = 0, run_id: Optional[str] = None, files: Optional[Dict[str, str]] = None) -> str:
    """Collective: every rank calls it. Writes ``step_<step>`` (model, optimizer, RNG, ``state`` as JSON,
    rank-0 ``tensors``, extra text ``files``), its manifest and marker, renames it into place, points
    ``latest`` at it and keeps the newest ``keep`` complete checkpoints (0: all). Returns the final folder.
    Raises :class:`CheckpointError` on every rank when any rank fails (module docstring)."""
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    try:
        on_rank0(lambda: _fresh_tmp(root, tmp))
        _on_every_rank(lambda: _write_contents(tmp, model, optimizer, dict(state, run_id=run_id), tensors, files),
                       root)
        entries = _hash_files(tmp, root)
        on_rank0(lambda: _finish(root, name, tmp, final, step, run_id, entries, keep))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        cause = str(e) if isinstance(e, (CheckpointError, RankZeroError)) else failure_cause(e, root)
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint {final} failed: {cause}; the earlier checkpoints are untouched "
                              f"and {os.path.basename(tmp)} was removed") from e
    barrier()
    return final


def _on_every_rank(fn: Callable[[], None], root: str) -> None:
    """Run ``fn`` on every rank, then agree: when any rank failed, every rank raises the failures by rank."""
    try:
        fn()
        mine = None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        mine = failure_cause(e, root)
    failed = [(r, m) for r, m in enumerate(gather_objects(mine)) if m]
    if failed:
        raise CheckpointError("; ".join(m if len(failed) == 1 and r == 0 else f"rank {r}: {m}" for r, m in failed))


def _fresh_tmp(root: str, tmp: str) -> None:
    os.makedirs(root, exist_ok=True)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)


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


def _hash_files(tmp: str, root: str) -> dict:
    """``{file: {size, sha256}}`` of every file of ``tmp``; each rank hashes its share, every rank gets all."""
    names = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n))) if rank() == 0 else None
    names = broadcast_object(names)
    mine = {}
    _on_every_rank(lambda: mine.update({n: {"size": os.path.getsize(os.path.join(tmp, n)),
                                            "sha256": sha256_file(os.path.join(tmp, n))}
                                        for n in rank_share(names)}), root)
    entries = {}
    for part in gather_objects(mine):
        entries.update(part)
    return entries


def _finish(root: str, name: str, tmp: str, final: str, step: int, run_id: Optional[str], entries: dict,
            keep: int) -> None:
    """Rank 0: manifest, marker, publish, rotation."""
    _write_manifest(tmp, step, run_id, entries)
    _publish(root, name, tmp, final)
    if keep and keep > 0:
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def _write_manifest(tmp: str, step: int, run_id: Optional[str], entries: dict) -> None:
    manifest = {"format": MANIFEST_FORMAT, "run_id": run_id, "step": step,
                "files": {n: entries[n] for n in sorted(entries)}}
    mbytes = json.dumps(manifest, indent=1).encode("utf-8")
    fsync_write(os.path.join(tmp, MANIFEST), mbytes)
    fsync_write(os.path.join(tmp, MARKER),
                json.dumps({"step": step, "manifest_sha256": hashlib.sha256(mbytes).hexdigest()}))
    fsync_dir(tmp)


def _publish(root: str, name: str, tmp: str, final: str) -> None:
    """Rank 0: rename ``tmp`` to ``final`` and point ``latest`` at it. An earlier complete folder of the same
    step (re-saving the final checkpoint of a resumed, finished run) is deleted only after the rename; an
    earlier folder without its marker is never deleted: it is moved aside as ``.rejected``."""
    old = None
    if os.path.exists(final):
        if os.path.isfile(os.path.join(final, MARKER)):
            old = final + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(final, old)
        else:
            moved = move_aside(final, f"no {MARKER} marker; replaced by a new save of step {name}")
            warn(f"{final} had no {MARKER} marker: moved to {moved} (not deleted) before saving that step again")
    os.rename(tmp, final)
    fsync_write(os.path.join(root, "latest.tmp"), name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    fsync_dir(root)
    if old:
        shutil.rmtree(old, ignore_errors=True)
