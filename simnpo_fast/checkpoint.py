"""Checkpoints: torch distributed checkpoints (DCP) of model + optimizer, written atomically, verified before
use, read without unpickling untrusted bytes; HF export.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/            one complete checkpoint (renamed from step_00000010.tmp only once complete)
        .metadata, __*.distcp   DCP shards of {"model", "optim"} (any world size can reload them)
        trainer_state.json      step, run id, sampler position, scheduler, the run's config (rank 0)
        config.yaml             the resolved config of the run that wrote it
        tensors.pt              rank-0 tensors (e.g. the cached NPO reference log-likelihoods)
        rng_rank<r>.pt          each rank's RNG state
        MANIFEST.json           run id, step, and the size and SHA-256 of every file above
        COMPLETE                written last, before the rename: step + SHA-256 of MANIFEST.json
    step_00000008.rejected/   a checkpoint that failed verification on resume, moved aside (never deleted)
    latest                    name of the newest complete checkpoint (informational; resume scans the folder)

A crash while writing leaves only a ``*.tmp`` folder, which is ignored (and removed by the next save), so the
last good checkpoint is never lost.

**Verification** (:func:`verify_checkpoint`, run before a checkpoint is used): the ``COMPLETE`` marker's hash
matches ``MANIFEST.json``; the manifest names this run; every listed file exists with its recorded size and
SHA-256 (the files are split over the ranks, so each rank hashes ``1/world`` of the bytes); the DCP metadata
parses with the restricted reader below and names only listed files; ``trainer_state.json`` parses; the RNG
and tensor files load with ``torch.load(weights_only=True)``. Any failure names the checkpoint and the file.

**Trust boundary.** The manifest detects corruption (truncation, a flipped bit, a missing file); it is not a
signature: whoever can write the folder can rewrite the manifest too. What keeps a crafted checkpoint from
running code is the reader: resume never calls ``pickle.load`` on checkpoint bytes. DCP's own reader unpickles
``.metadata`` with ``pickle.load`` and non-tensor entries with ``torch.load(weights_only=False)``; here
``.metadata`` goes through an unpickler that resolves only DCP's metadata dataclasses, ``torch.Size``, dtypes
and layouts (anything else is refused before it is called), and the non-tensor entries, the RNG states and the
tensors through ``torch.load(weights_only=True)``. Tensors are read by DCP with ``weights_only=True`` already.
A crafted checkpoint can still hold wrong *numbers*: load only checkpoints of runs you trust to be what they
claim.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from .distributed import barrier, broadcast_object
from .errors import CheckpointError

_STEP_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE_FILE = "trainer_state.json"
METADATA_FILE = ".metadata"
REJECTED_SUFFIX = ".rejected"
MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _fsync_write(path: str, data) -> None:
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
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


def _torch_save(obj, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _fsync_write(path, buf.getvalue())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _all_gather(obj) -> list:
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _share(names: List[str]) -> List[str]:
    """This rank's share of a sorted file list (rank r hashes files r, r + W, ...)."""
    return sorted(names)[_rank()::_world()]


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


# ----------------------------------------------------------------------------- save

def save_checkpoint(root: str, step: int, model, optimizer, *, state: dict, tensors: Optional[Dict] = None,
                    keep: int = 0, run_id: Optional[str] = None, files: Optional[Dict[str, str]] = None) -> str:
    """Collective: every rank calls it. Writes ``step_<step>`` (model, optimizer, RNG, ``state`` as JSON,
    rank-0 ``tensors``, extra text ``files``), its manifest and marker, renames it into place, points
    ``latest`` at it and keeps the newest ``keep`` checkpoints (0: all). Returns the final folder."""
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    _torch_save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    if _rank() == 0:
        _fsync_write(os.path.join(tmp, STATE_FILE), json.dumps(dict(state, run_id=run_id), indent=1))
        _torch_save(dict(tensors or {}), os.path.join(tmp, "tensors.pt"))
        for fname, text in (files or {}).items():
            _fsync_write(os.path.join(tmp, fname), text)
    barrier()
    # manifest: every rank hashes its share of the files, rank 0 writes it
    names = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n))) if _rank() == 0 else None
    names = broadcast_object(names)
    mine = {n: {"size": os.path.getsize(os.path.join(tmp, n)), "sha256": sha256_file(os.path.join(tmp, n))}
            for n in _share(names)}
    entries = {}
    for part in _all_gather(mine):
        entries.update(part)
    if _rank() == 0:
        manifest = {"format": MANIFEST_FORMAT, "run_id": run_id, "step": step,
                    "files": {n: entries[n] for n in sorted(entries)}}
        mbytes = json.dumps(manifest, indent=1).encode("utf-8")
        _fsync_write(os.path.join(tmp, MANIFEST), mbytes)
        _fsync_write(os.path.join(tmp, MARKER),
                     json.dumps({"step": step, "manifest_sha256": hashlib.sha256(mbytes).hexdigest()}))
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # re-saving a step (e.g. the final checkpoint of a resumed, finished run)
            old = final + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_write(os.path.join(root, "latest.tmp"), name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        _fsync_dir(root)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        if keep and keep > 0:
            for s, path in list_checkpoints(root)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: str):
    """Complete checkpoints ``[(step, path)]`` (a ``COMPLETE`` marker; not yet verified) in increasing step
    order."""
    if not os.path.isdir(root):
        return []
    out = []
    for n in os.listdir(root):
        m = _STEP_RE.match(n)
        p = os.path.join(root, n)
        if m and os.path.isfile(os.path.join(p, MARKER)):
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
        _fsync_write(os.path.join(dest, "REJECTED"), reason + "\n")
    except OSError:
        pass
    return dest


# ----------------------------------------------------------------------------- safe reading

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    *((_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                                   "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to a torch.layout, nothing else
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP ``.metadata`` file holds; any other global is refused *before* it could
    be called (the restricted-globals recipe of the ``pickle`` documentation)."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not a DCP metadata class)")


def read_dcp_metadata(path: str):
    """The DCP ``Metadata`` of the checkpoint folder ``path``, read with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(os.path.join(path, METADATA_FILE), "rb") as f:
        md = _MetadataUnpickler(f).load()
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "storage_data", None), dict):
        raise pickle.UnpicklingError(f"not a DCP Metadata object ({type(md).__name__})")
    return md


def _check_storage_paths(md, allowed) -> None:
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel not in allowed:
            raise ValueError(f"the DCP metadata points at {rel!r}, which is not a file listed in {MANIFEST}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the ``.metadata`` unpickle replaced by :func:`read_dcp_metadata`; shard paths must
    be files of the manifest."""

    def __init__(self, path: str, allowed_files):
        super().__init__(path)
        self._dir = os.fspath(path)
        self._allowed = frozenset(allowed_files)

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:
            raise FileNotFoundError("per-rank DCP metadata is not used by simnpo-fast checkpoints")
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_dcp_metadata(self._dir)
        _check_storage_paths(md, self._allowed)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries (optimizer hyper-parameters) are read with
    ``torch.load(weights_only=True)`` instead of ``weights_only=False``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        trusted = io.BytesIO()  # re-serialised by us: the parent's unrestricted torch.load only sees our bytes
        torch.save(obj, trusted)
        trusted.seek(0)
        super().load_bytes(read_item, trusted)


# ----------------------------------------------------------------------------- verification

@dataclass
class Verification:
    path: str
    ok: bool
    reason: str = ""
    state: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def _read_manifest(path: str, run_id: Optional[str]) -> dict:
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
        read_dcp_metadata_checked = read_dcp_metadata(path)
        _check_storage_paths(read_dcp_metadata_checked, files)
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
    """Collective. Check ``path`` against its manifest (see the module docstring); never raises for a bad
    checkpoint: returns ``Verification(ok=False, reason=...)`` naming the file."""
    def head():
        try:
            return True, _read_manifest(path, run_id)
        except Exception as e:  # noqa: BLE001
            return False, str(e)

    ok, manifest = broadcast_object(head() if _rank() == 0 else None)
    if not ok:
        return Verification(path, False, manifest)
    bad = []
    for n in _share(list(manifest["files"])):
        try:
            if sha256_file(os.path.join(path, n)) != manifest["files"][n]["sha256"]:
                bad.append(n)
        except OSError as e:
            bad.append(f"{n} ({e.strerror})")
    bad = sorted(b for part in _all_gather(bad) for b in part)
    if bad:
        return Verification(path, False, f"checksum mismatch in {', '.join(bad)}", manifest=manifest)

    def contents():
        try:
            return True, _check_contents(path, manifest)
        except Exception as e:  # noqa: BLE001
            return False, str(e)

    ok, state = broadcast_object(contents() if _rank() == 0 else None)
    if not ok:
        return Verification(path, False, state, manifest=manifest)
    return Verification(path, True, "", state=state, manifest=manifest)


# ----------------------------------------------------------------------------- load

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
        rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
        if os.path.isfile(rng_file):  # absent when resuming with more ranks than were saved
            set_rng_state(torch.load(rng_file, weights_only=True))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a verified checkpoint that does not fit this model / optimizer
        raise CheckpointError(f"{path}: cannot be loaded into this run's model and optimizer: "
                              f"{type(e).__name__}: {e}") from e
    return state, tensors


# ----------------------------------------------------------------------------- HF export

def full_model_state_dict(model) -> dict:
    """Collective: the full (unsharded) state dict of the HF model inside an UnlearnModel, on rank 0 (CPU);
    other ranks get ``{}``. Keys are the HF model's own keys."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return {}
    return {k[len("lm."):] if k.startswith("lm.") else k: v for k, v in sd.items()}


def export_hf(model, out_dir: str, tokenizer=None, *, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Collective. Rank 0 writes an HF folder (safetensors + config + tokenizer) that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads; written to ``out_dir.tmp`` and renamed.
    LoRA adapters are merged into the base weights."""
    from transformers import AutoModelForCausalLM

    sd = full_model_state_dict(model)
    hf = model.lm
    if _rank() == 0:
        config = hf.config
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        lora = getattr(hf, "_simnpo_lora_config", None)
        if lora:
            from .model import apply_lora
            with torch.device("meta"):
                fresh = apply_lora(fresh, lora)
        missing, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if not _tied_key(fresh, k)]
        if missing or unexpected:
            raise RuntimeError(f"HF export: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        if lora:
            peft_wrapper = _peft_wrapper_of(fresh)
            fresh = peft_wrapper.merge_and_unload() if peft_wrapper is not None else fresh
        if getattr(config, "tie_word_embeddings", False):
            fresh.tie_weights()
        _materialize_buffers(fresh)
        if dtype is not None:
            fresh = fresh.to(dtype)
        tmp = out_dir.rstrip("/") + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        fresh.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    barrier()
    return broadcast_object(out_dir if _rank() == 0 else None)


def _tied_key(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _peft_wrapper_of(model):
    # apply_lora returns the inner injected model; rebuild a PeftModel view to merge
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return None
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    _unwrap_lora(model)
    return None


def _unwrap_lora(model) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(m, cname, child.get_base_layer())


def _materialize_buffers(model) -> None:
    """Non-persistent buffers (e.g. rotary inv_freq) left on meta: replace by empty CPU tensors (not saved)."""
    for m in model.modules():
        for n, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
