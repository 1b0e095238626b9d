"""Everything a run needs before its first step: process group, data stream, sharded model (and frozen reference
for a retain KL), the loss, optimizer and LR schedule.

The method (:func:`simnpo_fast.methods.get_method` of ``loss.objective``) decides what is built: retain rows
in the stream when its loss has a retain term, a frozen sharded reference model when that term is a KL
(``reshard_after_forward=True``; its LM head is copied once, see :class:`~simnpo_fast.model.FrozenReference`),
the alternate answer rows when ``method.alternate != "none"`` (e.g. a refusal for every forget question), and a
cache of reference log-likelihoods (filled by the loop: of the forget rows and of every alternate candidate) when
``method.reference == "logp"``.
"""
from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import (DistInfo, apply_ac, apply_compile, apply_fsdp, init_distributed,
                           mixed_precision_policy)
from ..criterion import UnlearningCriterion
from ..errors import ModelError
from ..model import FrozenReference, UnlearnModel, build_hf_model
from .config import TrainConfig, grad_accum
from .datasets import prepare_alternates, prepare_data
from .schedule import build_scheduler
from .step import StepContext
from .stream import StepStream


@dataclass(kw_only=True)
class Run(StepContext):
    """The live state of a run: its :class:`~simnpo_fast.train.step.StepContext` (model, criterion, optimizer,
    schedule, reference caches, ``step`` = optimizer steps taken) plus the config, the process group, the step
    stream, the tokenizer, the forget / retain datasets and the method's alternate answers (or None)."""

    cfg: TrainConfig
    info: DistInfo
    stream: StepStream
    tokenizer: Any
    forget: Any
    retain: Any
    total_steps: int
    accum: int
    alternates: Any = None

    @property
    def epoch(self) -> int:
        return self.stream.epoch


#: parameter names without weight decay under ``optim.weight_decay_rule: hf``: transformers
#: ``Trainer.get_decay_parameter_names`` (its patterns; parameters of ``nn.LayerNorm`` modules likewise)
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                   r"_norm(?:$|\.)"))


def param_groups(model, optim_cfg) -> list:
    """The optimizer's parameter groups: every trainable parameter decayed (``weight_decay_rule: all``), or HF
    Trainer's rule (``hf``, what the SimNPO authors' runs used): biases and normalisation weights undecayed."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optim_cfg.weight_decay_rule == "all":
        return [p for _, p in params]
    in_layernorm = {f"{m}.{n}" if m else n for m, mod in model.named_modules()
                    if isinstance(mod, torch.nn.LayerNorm) for n, _ in mod.named_parameters(recurse=False)}
    skip = {n for n, _ in params if n in in_layernorm or any(p.search(n.lower()) for p in NO_DECAY_PATTERNS)}
    return [{"params": [p for n, p in params if n not in skip]},
            {"params": [p for n, p in params if n in skip], "weight_decay": 0.0}]


def build_criterion(cfg: TrainConfig) -> UnlearningCriterion:
    L = cfg.loss
    return UnlearningCriterion(L.objective, forget_weight=L.forget_weight, retain_weight=L.retain_weight,
                               beta=L.beta, gamma=L.gamma, retain_loss=L.retain_loss, grad_filter=L.grad_filter,
                               normalize=L.normalize)


def _shard(model: UnlearnModel, cfg: TrainConfig, info: DistInfo, reshard: bool) -> None:
    pc = cfg.parallel
    if info.device.type == "cuda" and not pc.cpu_offload:
        model.to(info.device)
    apply_fsdp(model, mp_policy=mixed_precision_policy(info.device, pc.mixed_precision),
               reshard_after_forward=reshard, cpu_offload=pc.cpu_offload)


def build_model(cfg: TrainConfig, info: DistInfo, tok, *, with_reference: bool):
    """``(model, reference)``: the sharded :class:`UnlearnModel` in train mode and, ``with_reference``, a frozen
    sharded copy of it as a :class:`FrozenReference` (else None)."""
    own_vocab = cfg.model.path is None
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = build_hf_model(cfg.model, vocab_size=len(tok) if own_vocab else None,
                        special_ids=special if own_vocab else None, device=info.device)
    n_emb = hf.get_input_embeddings().num_embeddings
    if len(tok) > n_emb:
        raise ModelError(f"model.path {cfg.model.path!r} has {n_emb} token embeddings but the tokenizer "
                         f"({cfg.data.tokenizer or cfg.model.path}) has {len(tok)} tokens: they do not belong together")
    ref_model = None
    if with_reference:
        ref_hf = copy.deepcopy(hf)
        ref_hf.requires_grad_(False)
        ref_model = UnlearnModel(ref_hf)
    model = UnlearnModel(hf)
    if cfg.parallel.activation_checkpointing:
        apply_ac(model)
    if cfg.parallel.compile:
        apply_compile(model)
    _shard(model, cfg, info, cfg.parallel.reshard_after_forward)
    reference = None
    if ref_model is not None:
        _shard(ref_model, cfg, info, True)
        ref_model.eval()
        reference = FrozenReference(ref_model)
    model.train()
    return model, reference


def build_stream(cfg: TrainConfig, info: DistInfo, tok, forget, retain, accum: int, alternates=None) -> StepStream:
    """The step stream over ``forget`` (paired with ``retain`` when given: the loss has a retain term; with
    each forget row's alternate answer of the epoch when ``alternates`` are given)."""
    from .. import data as D

    dataset = D.ForgetRetainDataset(forget, retain, seed=cfg.seed, pairing=cfg.data.pairing)
    if alternates is not None:
        dataset = D.WithAlternates(dataset, alternates)
    sampler = D.ShardedBatchSampler(len(dataset), cfg.batch_size // info.world_size, rank=info.rank,
                                    world_size=info.world_size, seed=cfg.seed, drop_last=False)
    collator = D.DataCollator.from_tokenizer(tok)
    return StepStream(dataset, sampler, collator, cfg.micro_batch_size, accum, retain is not None)


def setup(cfg: TrainConfig) -> Run:
    """Everything but the loop (see the module docstring); every rank calls it."""
    info = init_distributed(cfg.parallel.device)
    cfg.validate(info.world_size)
    accum = grad_accum(cfg, info.world_size)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    criterion = build_criterion(cfg)
    tok, forget, retain = prepare_data(cfg, info)
    alternates = prepare_alternates(cfg, tok, forget)
    model, reference = build_model(cfg, info, tok,
                                   with_reference=criterion.uses_retain and criterion.retain_loss == "kl")
    stream = build_stream(cfg, info, tok, forget, retain if criterion.uses_retain else None, accum, alternates)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * stream.sampler.num_steps))
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay, foreach=True)
    scheduler = build_scheduler(optimizer, o, total)
    return Run(model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler, device=info.device,
               max_grad_norm=o.max_grad_norm, reference=reference, cfg=cfg, info=info, stream=stream, tokenizer=tok,
               forget=forget, retain=retain, total_steps=total, accum=accum, alternates=alternates)
