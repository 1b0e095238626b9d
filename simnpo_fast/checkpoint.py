"""Checkpoints: torch distributed checkpoint (DCP) of model + optimizer, written atomically; HF export.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/            one complete checkpoint (renamed from step_00000010.tmp only once complete)
        .metadata, __*.distcp   DCP shards of {"model", "optim"} (any world size can reload them)
        trainer_state.json      step, epoch/sampler position, scheduler, config name (rank 0)
        tensors.pt              rank-0 tensors (e.g. the cached NPO reference log-likelihoods)
        rng_rank<r>.pt          each rank's RNG state
        COMPLETE                written last, before the rename
    latest                    name of the newest complete checkpoint (replaced atomically)

A crash while writing leaves only a ``*.tmp`` folder, which is ignored (and removed by the next save), so the
last good checkpoint is never lost. Loading uses DCP, JSON and ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from .distributed import barrier, broadcast_object

_STEP_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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


def save_checkpoint(root: str, step: int, model, optimizer, *, state: dict, tensors: Optional[Dict] = None,
                    keep: int = 0) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
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
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    if _rank() == 0:
        _fsync_write(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1))
        torch.save(dict(tensors or {}), os.path.join(tmp, "tensors.pt"))
    barrier()
    if _rank() == 0:
        _fsync_write(os.path.join(tmp, MARKER), str(step))
        old = None
        if os.path.exists(final):  # re-saving a step (e.g. after resuming from an older checkpoint)
            old = final + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_write(os.path.join(root, "latest.tmp"), name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        if old:
            shutil.rmtree(old, ignore_errors=True)
        if keep and keep > 0:
            for s, path in list_checkpoints(root)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: str):
    """Complete checkpoints ``[(step, path)]`` in increasing step order."""
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
    """The newest complete checkpoint folder (``latest`` pointer if valid, else a scan), or None."""
    ptr = os.path.join(root, "latest")
    if os.path.isfile(ptr):
        with open(ptr, encoding="utf-8") as f:
            p = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(p, MARKER)):
            return p
    cks = list_checkpoints(root)
    return cks[-1][1] if cks else None


def load_checkpoint(path: str, model, optimizer) -> Tuple[dict, dict]:
    """Collective. Restores model, optimizer and this rank's RNG; returns ``(trainer_state, tensors)``."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    tensors = torch.load(os.path.join(path, "tensors.pt"), weights_only=True, map_location="cpu")
    rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_file):  # absent when resuming with more ranks than were saved
        set_rng_state(torch.load(rng_file, weights_only=True))
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
