"""Evaluation during training (``eval_every``): TOFU metrics every N optimizer steps, kept as a history for
:func:`simnpo_fast.eval.result_files.curves`.

The trainer calls ``hooks["after_backward"](run, s)`` just before optimizer step ``s``: the weights then are those
after ``s - 1`` steps, so :class:`EvalHook` evaluates when ``(s - 1) % every == 0`` and records step ``s - 1``
(an ``after_step(run, step)`` entry point is there too, for a trainer that calls hooks after the update).
``finish(run_or_model)`` adds the final weights. Under FSDP the parameters are sharded DTensors: the hook gathers
the full state dict (collective), rebuilds a plain HF model on every rank and evaluates that, sharded as usual.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..distributed import broadcast_object, rank
from .result_files import save_json
from .runner import unwrap
from .tofu import TofuEvalConfig, evaluate_tofu


def _is_sharded(model) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def plain_model(model):
    """A non-sharded HF model with ``model``'s current weights (``model`` itself when it is not sharded)."""
    if not _is_sharded(model):
        return unwrap(model)
    from ..train.checkpoint import full_model_state_dict

    sd = broadcast_object(full_model_state_dict(model))  # collective; full tensors on rank 0, then on every rank
    hf = unwrap(model)
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config))
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"eval hook: cannot rebuild the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.eval()
    return fresh


class EvalHook:
    """``hooks = {"after_backward": EvalHook(data_dir, tokenizer, every=10)}``; ``hook.history`` is a list of
    ``{"step", "summary"}``; with ``out_path`` it is saved (rank 0) after every evaluation."""

    def __init__(self, data_dir: str, tokenizer, every: int, cfg: Optional[TofuEvalConfig] = None, *,
                 reference=None, out_path: Optional[str] = None, progress: bool = False):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.data_dir, self.tokenizer, self.every = data_dir, tokenizer, int(every)
        self.cfg = cfg or TofuEvalConfig()
        self.reference, self.out_path, self.progress = reference, out_path, progress
        self.history: list[dict] = []
        self._done: set[int] = set()

    def evaluate(self, model, step: int) -> dict:
        if step in self._done:
            return {}
        m = plain_model(model)
        res = evaluate_tofu(m, self.tokenizer, self.data_dir, copy.deepcopy(self.cfg), reference=self.reference,
                            progress=self.progress)
        self._done.add(step)
        self.history.append({"step": int(step), "summary": res["summary"]})
        if self.out_path and rank() == 0:
            save_json(self.history, self.out_path)
        return res

    # the trainer's hook: called before optimizer step ``step`` (weights = after ``step - 1`` steps)
    def __call__(self, run, step: int) -> None:
        done = step - 1
        if done % self.every == 0:
            with torch.no_grad():
                self.evaluate(run.model, done)

    def after_step(self, run, step: int) -> None:
        if step % self.every == 0:
            with torch.no_grad():
                self.evaluate(run.model, step)

    def finish(self, run_or_model, step: int) -> dict:
        model = getattr(run_or_model, "model", run_or_model)
        return self.evaluate(model, step)
