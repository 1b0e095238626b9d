"""A run folder belongs to one run: a lock held for the run's life, a run id, and the fresh / resume / overwrite
decision, made before any work.

    <output_dir>/
        run.lock        {pid, host, process start time, run id, heartbeat}: rank 0 holds it while the run lives
        run.json        {run_id, created, config}: the run that owns the folder and its current config
        checkpoints/    step_XXXXXXXX/ each with a MANIFEST.json naming the run id (see simnpo_fast/train/checkpoint)
        replaced/<UTC time>-<old run id>/   a previous run moved aside by ``--overwrite`` (never deleted)

Rules (:func:`open_run`):

* **Lock** (:mod:`simnpo_fast.train.run_lock`): one live run per folder; a stale lock is taken over.
* **Fresh run** (no resume): refused when the folder holds complete checkpoints (of another run, by
  construction); ``overwrite=True`` moves that run's files into ``replaced/`` first. When there is nothing to
  resume (a run killed before its first checkpoint, or one that keeps none), the earlier run's files are moved
  into ``replaced/`` as well (all but :data:`KEPT_FOR_A_FRESH_RUN`), so an old exported model or log never
  passes for the new run's, even when the new run is killed before it exports.
* **Resume** (``resume=True``): needs a checkpoint; the requested config must equal the run's except for the
  keys of :data:`RESUME_MAY_CHANGE` (the message lists the keys that differ). Candidates are verified newest
  first (:func:`simnpo_fast.train.checkpoint.verify_checkpoint`); one that fails is reported by name, moved aside to
  ``step_X.rejected`` and the previous one is tried. ``resume="auto"`` resumes when there is a checkpoint and
  starts fresh, on purpose, when there is none.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

from ..distributed import on_rank0
from ..errors import CheckpointError, ConfigError, RunFolderError, warn
from .checkpoint import list_checkpoints, move_aside, verify_checkpoint
from .run_lock import RunLock, now_utc

RUN_FILE = "run.json"
REPLACED_DIR = "replaced"
CHECKPOINT_DIR = "checkpoints"
#: Left in place when a fresh run moves an earlier run's files aside without --overwrite: the generated synthetic
#: corpus (reused only when its recorded parameters match) and a finished finetune stage (reused only when made
#: with the same finetune config).
KEPT_FOR_A_FRESH_RUN = ("data", "finetune")

#: Config keys (dotted; a key also covers its sub-keys) that may differ between a run and its resumption:
#: the step budget (a longer or shorter run; a cosine / linear schedule follows the new total), logging,
#: evaluation and checkpoint cadence, the folder's own path, and memory / speed switches that leave the maths
#: unchanged. Anything else (data, model, loss, optimizer, seed, batch geometry, finetune stage) must match.
RESUME_MAY_CHANGE = (
    "max_steps", "epochs", "log_every", "progress", "plot", "evaluate", "name", "output_dir",
    "checkpoint.every", "checkpoint.keep", "checkpoint.final", "checkpoint.export_hf", "checkpoint.resume",
    "parallel.activation_checkpointing", "parallel.cpu_offload", "parallel.compile",
    "parallel.reshard_after_forward",
)


# ============================================================================= run identity and config drift

def read_run_file(folder: str) -> Optional[dict]:
    p = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            info = json.load(f)
        if isinstance(info, dict) and info.get("run_id"):
            return info
    except (OSError, ValueError):
        pass
    warn(f"{p} is unreadable; the run id is taken from the checkpoints")
    return None


def write_run_file(folder: str, run_id: str, config: dict, created: Optional[str] = None) -> None:
    info = {"run_id": run_id, "created": created or now_utc(), "updated": now_utc(), "host": socket.gethostname(),
            "config": config}
    tmp = os.path.join(folder, RUN_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, RUN_FILE))


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v and key not in ("data.synthetic", "model.config", "model.lora"):
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in RESUME_MAY_CHANGE)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


#: config keys holding a local path: compared as canonical paths (``~``, relative spellings, trailing slashes
#: and symlinks resolved against the current directory), so another spelling of the same folder is no change
PATH_KEYS = ("model.path", "data.path", "data.tokenizer", "output_dir")


def _canonical(v):
    return os.path.realpath(os.path.expanduser(v)) if isinstance(v, str) and v else v


def config_differences(old: dict, new: dict) -> List[str]:
    """``"key: old -> new"`` for every key outside :data:`RESUME_MAY_CHANGE` whose value differs (paths of
    :data:`PATH_KEYS` compared canonically)."""
    fo, fn = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(fo) | set(fn)):
        if _may_change(k):
            continue
        a, b = fo.get(k, "<absent>"), fn.get(k, "<absent>")
        if k in PATH_KEYS and _canonical(a) == _canonical(b):
            continue
        if not _same(a, b):
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def _drift_error(folder: str, where: str, diffs: List[str]) -> RunFolderError:
    return RunFolderError(
        f"--resume of {folder}: the config differs from the run's ({where}) in {len(diffs)} key(s): "
        f"{'; '.join(diffs)}. Only {', '.join(RESUME_MAY_CHANGE)} may change on resume; start a new run instead "
        "(another output_dir, or --overwrite to move this one aside)")


# ============================================================================= the decision

@dataclass
class RunFolder:
    """What :func:`open_run` decided; ``resume_from`` is a *verified* checkpoint (or None for a fresh run)."""

    path: str
    run_id: str
    resume_from: Optional[str] = None
    state: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    rejected: List[Tuple[str, str]] = field(default_factory=list)
    moved_to: Optional[str] = None
    lock: Optional[RunLock] = None
    started: bool = False  # set by the loop once a step has run: a fresh run that fails before leaves no trace

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, CHECKPOINT_DIR)

    def heartbeat(self) -> None:
        if self.lock is not None:
            self.lock.heartbeat()


def _move_previous_run(folder: str, names: Sequence[str], old_id: Optional[str]) -> Optional[str]:
    present = [n for n in names if os.path.lexists(os.path.join(folder, n))
               and not (os.path.isdir(os.path.join(folder, n)) and not os.listdir(os.path.join(folder, n)))]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(folder, REPLACED_DIR, f"{stamp}-{(old_id or 'unknown')[:12]}")
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(folder, REPLACED_DIR, f"{stamp}-{(old_id or 'unknown')[:12]}-{n}")
    os.makedirs(dest)
    for name in present:
        os.rename(os.path.join(folder, name), os.path.join(dest, name))
    return dest


def _plan(folder: str, config: dict, resume, overwrite: bool, artifacts: Sequence[str]) -> dict:
    """Rank 0, under the lock, no collectives: fresh or resume, and the candidate checkpoints."""
    cks = list_checkpoints(os.path.join(folder, CHECKPOINT_DIR), complete_only=False)  # unmarked: rejected below
    run = read_run_file(folder)
    if resume is False or (resume == "auto" and not cks):
        if cks and not overwrite:
            owner = f" of run {run['run_id']}" if run else ""
            raise RunFolderError(
                f"{folder} holds {len(cks)} checkpoint(s){owner} (newest: {os.path.basename(cks[-1][1])}); a fresh "
                "run would mix with them. Pass --resume to continue that run, --overwrite to move it aside into "
                f"{os.path.join(folder, REPLACED_DIR)}/, or choose another output_dir")
        old_id = run["run_id"] if run else None
        if overwrite:
            moved = _move_previous_run(folder, artifacts, old_id)
            if moved:
                warn(f"--overwrite: the previous run's files were moved to {moved}")
        else:  # nothing to resume: an earlier run's files (a model it exported, its log) must not pass for ours
            moved = _move_previous_run(folder, [a for a in artifacts if a not in KEPT_FOR_A_FRESH_RUN], old_id)
            if moved:
                warn(f"{folder} held files of an earlier run with no checkpoint; moved to {moved}")
        return {"mode": "fresh", "run_id": uuid.uuid4().hex, "moved_to": moved, "config": config}
    if not cks:
        raise RunFolderError(
            f"--resume: nothing to resume in {os.path.join(folder, CHECKPOINT_DIR)} (no complete checkpoint). Run "
            "without --resume to start fresh, or with --resume=auto to resume when there is something to resume")
    if run is not None:
        diffs = config_differences(run.get("config", {}), config)
        if diffs:
            raise _drift_error(folder, os.path.join(folder, RUN_FILE), diffs)
    return {"mode": "resume", "run_id": run["run_id"] if run else None,
            "created": run.get("created") if run else None,
            "candidates": [p for _, p in reversed(cks)], "config": config}


def _on_rank0(is_main: bool, fn):
    def call():
        try:
            return fn()
        except OSError as e:  # e.g. a read-only or full file system
            raise RunFolderError(f"{type(e).__name__}: {e}") from e

    return on_rank0(call, is_main)


@contextlib.contextmanager
def open_run(folder: str, config: dict, *, resume=False, overwrite: bool = False, artifacts: Sequence[str] = (),
             is_main: bool = True) -> Iterator[RunFolder]:
    """Collective (every rank enters). Lock ``folder`` (rank 0), decide fresh / resume (see the module
    docstring), verify the resume candidates, and yield a :class:`RunFolder`; the lock is released on exit.
    ``config`` is the requested config as a dict (stored in ``run.json``, compared on resume); ``artifacts``
    are the names ``overwrite`` moves aside."""
    if resume not in (False, True, "auto"):
        raise ConfigError(f"checkpoint.resume must be false, true or auto, got {resume!r}")
    if overwrite and resume is not False:
        raise ConfigError("--overwrite starts a fresh run: it cannot be combined with --resume")
    lock = RunLock(folder) if is_main else None
    _on_rank0(is_main, lambda: lock.acquire() and None)
    try:
        plan = _on_rank0(is_main, lambda: _plan(folder, config, resume, overwrite, artifacts))
        rf = RunFolder(folder, plan["run_id"], moved_to=plan.get("moved_to"), lock=lock)
        if plan["mode"] == "resume":
            _resume(rf, plan, config, is_main)
        else:
            def start():
                write_run_file(folder, rf.run_id, config)
                lock.set_run_id(rf.run_id)

            _on_rank0(is_main, start)
        try:
            yield rf
        except BaseException:
            if plan["mode"] == "fresh" and not rf.started and is_main:
                _forget_unstarted_run(folder, rf.run_id)
            raise
    finally:
        if lock is not None:
            lock.release()


def _forget_unstarted_run(folder: str, run_id: str) -> None:
    """Rank 0, a fresh run failing before its first step (bad data, model, tokenizer): remove the ``run.json``
    and ``config.yaml`` it wrote, so the corrected rerun does not take it for an earlier run to move aside."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        if (read_run_file(folder) or {}).get("run_id") == run_id:
            for name in ("config.yaml", RUN_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))


def _resume(rf: RunFolder, plan: dict, config: dict, is_main: bool) -> None:
    """Collective: verify the candidates newest first, fill ``rf`` from the first that passes, check its stored
    config, move the failed ones aside and record the run (rank 0)."""
    failures = []
    for path in plan["candidates"]:
        v = verify_checkpoint(path, run_id=plan["run_id"])
        if v.ok:
            rf.resume_from, rf.state, rf.manifest = path, v.state, v.manifest
            break
        failures.append((path, v.reason))
        if is_main:
            warn(f"checkpoint {path} failed verification: {v.reason}; trying the previous one")
    if rf.resume_from is None:
        raise CheckpointError(
            f"--resume of {rf.path}: no checkpoint passes verification: "
            + "; ".join(f"{os.path.basename(p)}: {r}" for p, r in failures))
    rf.run_id = rf.run_id or rf.state.get("run_id") or rf.manifest.get("run_id")
    stored = rf.state.get("config")
    if isinstance(stored, dict):
        diffs = config_differences(stored, config)
        if diffs:
            raise _drift_error(rf.path, os.path.join(rf.resume_from, "trainer_state.json"), diffs)

    def bookkeeping():
        moved = [(move_aside(p, r), r) for p, r in failures]
        write_run_file(rf.path, rf.run_id, config, created=plan.get("created"))
        rf.lock.set_run_id(rf.run_id)
        return moved

    rf.rejected = _on_rank0(is_main, bookkeeping)
    if is_main:
        warn(f"resuming run {rf.run_id} from {rf.resume_from}")
