"""Model glue: build / load an HF causal LM, put the fused loss *inside* the LM head's forward.

Why the head owns the loss: under FSDP2 the LM-head weight is a sharded DTensor outside its module's forward.
Reading ``weight.full_tensor()`` from outside gives silently wrong LM-head gradients; reading ``self.weight``
inside the head's own forward gets the all-gathered parameter and FSDP's backward hooks reduce-scatter its
gradient correctly. So:

* :class:`FusedLMHeadLoss` is an ``nn.Linear`` (same parameter names, so checkpoints and ``save_pretrained`` are
  unchanged). ``head(hidden)`` returns logits as before; ``head(hidden, loss_fn, **kw)`` returns
  ``loss_fn(self.weight, self.bias, hidden, **kw)`` -- a fused loss, never a ``[tokens, V]`` logits tensor.
* :class:`UnlearnModel` wraps the HF causal LM: ``forward(input_ids, attention_mask, loss_fn, **kw)`` runs the
  backbone to the final hidden states and hands them to the head. FSDP shards the decoder layers one by one,
  ``[norm, lm_head]`` as one unit and the rest (embeddings; and the LM head when it is tied to them) in the root.
* :func:`patch` makes an existing HF model's ``forward(..., labels=...)`` return the fused loss (HF drop-in).

Head losses (``loss_fn(weight, bias, hidden, **kw)``): :meth:`UnlearningCriterion.head_loss
<simnpo_fast.criterion.UnlearningCriterion.head_loss>` (unlearning), :func:`logprob_head`, :func:`nll_head`;
:class:`FrozenReference` gives the retain KL its reference. :func:`backbone_of` / :func:`final_hidden` reach
any HF causal LM's final hidden states.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .criterion import ReferenceHead
from .objectives import NLL
from .ops import fused_sequence_loss, sequence_logprob

#: The named model shapes (hub downloads are impossible), one table for both users: ``model.preset`` name -> the HF
#: config of a model built from scratch (``model_type`` llama unless given), and the memory planner's ``--model``
#: (:func:`simnpo_fast.plan.load_model` reads the shape keys). ``tiny-llama`` is the embedded default (its vocab
#: comes from the trained tokenizer); the others are Llama-style shapes with their published config.json values.
PRESET_CONFIGS: Dict[str, Dict[str, Any]] = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=1024),
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}  # fp64: equality tests against reference code


@dataclass
class ModelConfig:
    """Where the model comes from: ``path`` (a local HF folder) or ``preset`` + ``config`` overrides."""

    path: Optional[str] = None
    preset: Optional[str] = "tiny-llama"
    config: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    attn_implementation: str = "auto"  # auto: flash_attention_2 on GPU when installed, else sdpa
    trust_remote_code: bool = False
    seed: int = 0  # initialisation seed of a model built from a config
    lora: Dict[str, Any] = field(default_factory=dict)  # e.g. {r: 16, alpha: 32, target_modules: [q_proj, v_proj]}

    def validate(self) -> None:
        if self.path is None and self.preset is None and not self.config:
            raise ValueError("model: give model.path (a local HF folder) or model.preset / model.config")
        if self.path is not None and not os.path.isdir(self.path):
            raise FileNotFoundError(f"model.path {self.path!r} is not a local folder (no hub downloads)")
        if self.preset is not None and self.path is None and self.preset not in PRESET_CONFIGS:
            raise ValueError(f"unknown model.preset {self.preset!r}; choose one of {sorted(PRESET_CONFIGS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def pick_attn_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_model_config(path: str, trust_remote_code: bool = False) -> None:
    """The model folder's ``config.json`` parses into an HF config, else a :class:`ModelError` naming it: the
    tokenizer is read from the model folder before the model, and a broken model config must not pass for a
    tokenizer error."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        from .errors import ModelError

        raise ModelError(f"model.path {path!r}: cannot load the model's config.json: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:400]}") from e


def build_hf_model(cfg: ModelConfig, *, vocab_size: Optional[int] = None, special_ids: Optional[dict] = None,
                   device: torch.device = torch.device("cpu")):
    """The HF causal LM, on CPU, in ``cfg.dtype``: loaded from ``cfg.path`` (safetensors preferred) or built from
    the preset/config (seeded init). ``vocab_size``/``special_ids`` override the config (tokenizer-driven)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg.validate()
    dtype = DTYPES[cfg.dtype]
    attn = pick_attn_implementation(cfg.attn_implementation, device)
    if cfg.path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn,
                                                         trust_remote_code=cfg.trust_remote_code, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers / safetensors raise many types
            from .errors import ModelError

            raise ModelError(f"model.path {cfg.path!r}: cannot load the model: {type(e).__name__}: {e}") from e
    else:
        kw = dict(PRESET_CONFIGS.get(cfg.preset, {})) if cfg.preset else {}
        kw.update(cfg.config)
        if vocab_size is not None:
            kw["vocab_size"] = int(vocab_size)
        kw.update(special_ids or {})
        model_type = kw.pop("model_type", "llama")
        hf_cfg = AutoConfig.for_model(model_type, **kw)
        hf_cfg._attn_implementation = attn
        with _fork_rng(cfg.seed):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=attn)
    if cfg.lora:
        model = apply_lora(model, cfg.lora)
    return model


class _fork_rng:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)


def apply_lora(model, lora: Dict[str, Any]):
    """Inject LoRA adapters (``peft``); returns the injected HF model (adapters trainable, the rest frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover
        raise ImportError("model.lora needs peft: pip install peft") from e
    lcfg = LoraConfig(r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)),
                      lora_dropout=float(lora.get("dropout", 0.0)),
                      target_modules=lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    inner = peft_model.base_model.model  # the HF model with LoRA layers injected in place
    inner._simnpo_lora_config = dict(lora)
    return inner


# ----------------------------------------------------------------------------- the head

class FusedLMHeadLoss(nn.Linear):
    """The LM head Linear that can also compute a fused loss from hidden states inside its own forward."""

    def forward(self, hidden: torch.Tensor, loss_fn: Optional[Callable] = None, **kw):  # type: ignore[override]
        if loss_fn is None:
            return F.linear(hidden, self.weight, self.bias)
        return loss_fn(self.weight, self.bias, hidden, **kw)


def fuse_head(hf_model) -> FusedLMHeadLoss:
    """Turn the model's output embedding into a :class:`FusedLMHeadLoss` in place (same parameters, tying kept)."""
    head = hf_model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise TypeError(f"{type(hf_model).__name__} has no nn.Linear output embedding to fuse")
    if not isinstance(head, FusedLMHeadLoss):
        head.__class__ = FusedLMHeadLoss if type(head) is nn.Linear else type(
            "Fused" + type(head).__name__, (FusedLMHeadLoss, type(head)), {})
    return head


def head_is_tied(hf_model) -> bool:
    emb, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    return emb is not None and head is not None and emb.weight is head.weight


def backbone_of(hf_model) -> nn.Module:
    """The decoder stack returning final hidden states: ``model.<base_model_prefix>`` (``model.model`` for
    Llama-like models), else ``model.model``; ``TypeError`` naming the class when there is neither."""
    prefix = getattr(hf_model, "base_model_prefix", None) or "model"
    base = getattr(hf_model, prefix, None)
    if base is None or base is hf_model:
        base = getattr(hf_model, "model", None)
    if base is None or base is hf_model:
        raise TypeError(f"cannot find the backbone of {type(hf_model).__name__} (expected .{prefix} or .model)")
    return base


def last_hidden_state(out) -> torch.Tensor:
    """The final hidden states ``[B, T, d]`` from a backbone's output (a tensor, a tuple or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.last_hidden_state


def final_hidden(hf_model, input_ids, attention_mask=None, **kw) -> torch.Tensor:
    """``hf_model``'s final hidden states (its backbone only: no LM head, no logits)."""
    return last_hidden_state(backbone_of(hf_model)(input_ids=input_ids, attention_mask=attention_mask, **kw))


class UnlearnModel(nn.Module):
    """``forward(input_ids, attention_mask, loss_fn, **kw)`` = ``loss_fn(weight, bias, final hidden states, **kw)``
    computed inside the LM head's forward (logits without ``loss_fn``).

    ``self.lm`` is the HF causal LM (state-dict keys ``lm.<hf key>``); its head is a :class:`FusedLMHeadLoss`.
    """

    def __init__(self, hf_model):
        super().__init__()
        fuse_head(hf_model)
        self.lm = hf_model

    @property
    def backbone(self) -> nn.Module:
        return backbone_of(self.lm)

    @property
    def head(self) -> FusedLMHeadLoss:
        return self.lm.get_output_embeddings()

    @property
    def tied(self) -> bool:
        return head_is_tied(self.lm)

    def decoder_layers(self):
        return list(self.backbone.layers)

    def final_norm(self) -> Optional[nn.Module]:
        return getattr(self.backbone, "norm", None)

    def forward(self, input_ids, attention_mask=None, loss_fn: Optional[Callable] = None, **kw):
        hidden = final_hidden(self.lm, input_ids, attention_mask, use_cache=False)
        return self.head(hidden, loss_fn=loss_fn, **kw)


# ----------------------------------------------------------------------------- head losses
# Each is loss_fn(weight, bias, hidden, **kw); UnlearningCriterion.head_loss(batch, counts) is the unlearning one.

def logprob_head(weight, bias, hidden, *, labels, backend=None, shift: bool = True):
    """``(logp_sum [B], n_tokens [B])`` of ``labels`` (use under ``torch.no_grad()`` to cache them;
    ``backend`` and ``shift`` as in :func:`~simnpo_fast.ops.sequence_logprob`)."""
    return sequence_logprob(hidden, weight, labels, bias=bias, shift=shift, backend=backend)


def nll_head(weight, bias, hidden, *, labels, normalizer=None):
    """``(loss, logp_sum, n_tokens)``: token-mean NLL of ``labels`` (``sum / normalizer`` when given)."""
    red = "mean" if normalizer is None else "sum"
    return fused_sequence_loss(hidden, weight, labels, NLL(), bias=bias, reduction=red, normalizer=normalizer,
                               return_logp=True)


def _autocast_nll_head(weight, bias, hidden, *, labels, normalizer=None):
    """:func:`nll_head` at the precision HF's own head would have: under ``torch.autocast`` (HF
    ``Trainer(fp16=True)`` / accelerate) ``F.linear`` runs in the autocast dtype, so hidden, weight and bias are
    cast to it (gradients flow back through the casts to the fp32 master weights); the fused op itself then
    runs with autocast off."""
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev):
        return nll_head(weight, bias, hidden, labels=labels, normalizer=normalizer)
    dt = torch.get_autocast_dtype(dev)
    with torch.autocast(dev, enabled=False):
        return nll_head(weight.to(dt), None if bias is None else bias.to(dt), hidden.to(dt), labels=labels,
                        normalizer=normalizer)


class FrozenReference:
    """A frozen reference model for the retain KL: ``ref(input_ids, attention_mask)`` runs it (no grad) to its
    final hidden states and returns them with its LM head as a :class:`~simnpo_fast.modules.ReferenceHead`. The
    head is copied on first use and kept here (a sharded FSDP unit frees its gathered weight after forward)."""

    def __init__(self, model: UnlearnModel):
        self.model = model
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    def _capture(self, weight, bias, hidden) -> ReferenceHead:
        if self.weight is None:
            self.weight = weight.detach().clone()
            self.bias = None if bias is None else bias.detach().clone()
        return ReferenceHead(hidden.detach(), self.weight, self.bias)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None) -> ReferenceHead:
        return self.model(input_ids, attention_mask, self._capture)


# ----------------------------------------------------------------------------- HF drop-in

def patch(model, *, ignore_index: int = -100, backend=None):
    """Make an HF causal LM compute its loss with the fused LM head (no ``[tokens, V]`` logits).

    After ``patch(model)``:

    * ``model(input_ids, attention_mask)`` (no labels) is unchanged: logits as before (generation works);
    * ``model(input_ids, attention_mask, labels=labels)`` returns ``CausalLMOutputWithPast(loss=..., logits=None,
      hidden_states=(last_hidden,))`` where ``loss`` is the token-mean NLL over ``labels != -100`` (HF's shifted
      cross-entropy, same value) computed inside the LM head's forward (FSDP / DeepSpeed / accelerate safe), in
      the autocast dtype under ``torch.autocast`` like HF's head (fp16 + ``GradScaler`` works: the loss scale is
      applied in fp32 before the gradients are rounded to fp16, see ``simnpo_fast/ops.py``);
    * ``model(input_ids, attention_mask, loss_fn=fn)`` returns ``fn(weight, bias, hidden)`` computed inside the
      head's forward (e.g. ``criterion.head_loss(batch, counts)``, as :class:`simnpo_fast.hf.UnlearningTrainer`
      does).

    Returns the same model object. Idempotent.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if getattr(model, "_simnpo_patched", False):
        return model
    fuse_head(model)
    orig_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, *args, loss_fn=None,
                num_items_in_batch=None, **kw):
        if labels is None and loss_fn is None:
            return orig_forward(input_ids=input_ids, attention_mask=attention_mask, *args, **kw)
        kw.pop("use_cache", None)
        kw.pop("return_dict", None)
        if args:
            raise TypeError("a patched model takes input_ids, attention_mask and labels positionally, nothing more")
        hidden = final_hidden(self, input_ids, attention_mask, use_cache=False, **kw)
        head = self.get_output_embeddings()
        if loss_fn is not None:
            return head(hidden, loss_fn=loss_fn)
        norm = None if num_items_in_batch is None else float(num_items_in_batch)
        loss, _, _ = head(hidden, loss_fn=_autocast_nll_head, labels=labels, normalizer=norm)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=(hidden,))

    model.forward = types.MethodType(forward, model)
    model._simnpo_patched = True
    return model
