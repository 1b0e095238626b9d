"""The trained model as an HF folder (safetensors + config + tokenizer), LoRA adapters merged."""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ...distributed import barrier, broadcast_object, rank


def full_model_state_dict(model) -> dict:
    """Collective: the full (unsharded) state dict of the HF model inside an UnlearnModel, on rank 0 (CPU);
    other ranks get ``{}``. Keys are the HF model's own keys."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() != 0:
        return {}
    return {k[len("lm."):] if k.startswith("lm.") else k: v for k, v in sd.items()}


def export_hf(model, out_dir: str, tokenizer=None, *, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Collective. Rank 0 writes an HF folder (safetensors + config + tokenizer) that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads; written to ``out_dir.tmp`` and renamed.
    LoRA adapters are merged into the base weights."""
    sd = full_model_state_dict(model)
    if rank() == 0:
        fresh = _hf_model_from(sd, model.lm)
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
    return broadcast_object(out_dir if rank() == 0 else None)


def _hf_model_from(sd: dict, hf):
    """A plain HF model of ``hf``'s config holding the state dict ``sd`` (LoRA merged, tied weights tied)."""
    from transformers import AutoModelForCausalLM

    config = hf.config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    lora = getattr(hf, "_simnpo_lora_config", None)
    if lora:
        from ...model import apply_lora

        with torch.device("meta"):
            fresh = apply_lora(fresh, lora)
    missing, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not _tied_key(fresh, k)]
    if missing or unexpected:
        raise RuntimeError(f"HF export: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    if lora:
        _merge_lora(fresh)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    _materialize_buffers(fresh)
    return fresh


def _tied_key(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _merge_lora(model) -> None:
    """Merge every LoRA layer into its base layer and put the base layers back in place (``apply_lora`` returns
    the injected HF model, not a ``PeftModel``, so ``merge_and_unload`` is not available)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    for m in list(model.modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(m, cname, child.get_base_layer())


def _materialize_buffers(model) -> None:
    """Non-persistent buffers (e.g. rotary inv_freq) left on meta: replace by empty CPU tensors (not saved)."""
    for m in model.modules():
        for n, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
