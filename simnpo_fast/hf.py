"""Drop-in for HF Trainer / accelerate users: fused SimNPO / NPO / GA / GradDiff / IdkDPO without full logits.

    from simnpo_fast.hf import UnlearningTrainer, ForgetRetainCollator
    trainer = UnlearningTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                                train_dataset=ForgetRetainDataset(forget, retain),
                                data_collator=ForgetRetainCollator.from_tokenizer(tok),
                                objective="simnpo", beta=2.5, forget_weight=1.0, retain_weight=1.0)
    trainer.train()

The model is :func:`simnpo_fast.model.patch`-ed: the forget and retain batches go through the backbone in one
forward and the loss is computed inside the LM head's forward (correct under FSDP / DeepSpeed ZeRO-3, which
gather the head weight for that forward). Training losses are normalised exactly: the Trainer hands each
optimizer step's micro-batches to :meth:`UnlearningTrainer.get_batch_samples`, which counts the step's forget
sequences (forget tokens for GA / GradDiff) and retain answer tokens over all micro-batches and processes;
every micro-batch loss is then ``sum / count``, so gradient accumulation and data parallelism give the
full-batch gradient (not a mean of per-micro-batch means: the accumulation bug of Liger-Kernel #802 and of
pre-4.46 HF). Outside training (``compute_loss`` without those counts) the loss is the batch's own mean.
For NPO, :func:`add_reference_logps` caches the reference model's log-likelihoods once (no reference model
is kept). A method with alternate answers (IdkDPO) trains on a dataset whose items also carry them:
``data.WithAlternates(ForgetRetainDataset(...), alternates)`` or ``data.load_forget_retain(..., idk=True)``;
:func:`add_reference_logps` then also caches the reference log-likelihood of every alternate candidate.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import transformers

from .batch import ForgetRetainBatch, StepCounts
from .criterion import UnlearningCriterion
from .data import DataCollator
from .likelihood import sequence_logps
from .model import patch


class ForgetRetainCollator:
    """``[{"forget": ex, "retain": ex[, "alternate": ex, "alternate_index": int][, "ref_logp_sum": float
    [, "ref_alt_logp_sum": float]]}]`` -> ``{"forget": {...}, "retain": {...}[, "alternate": {...},
    "alternate_index": [B]][, "ref_logp_sum": [B][, "ref_alt_logp_sum": [B]]]}`` (right padding by lengths)."""

    def __init__(self, collator: DataCollator):
        self.collator = collator

    @classmethod
    def from_tokenizer(cls, tokenizer, **kw) -> "ForgetRetainCollator":
        return cls(DataCollator.from_tokenizer(tokenizer, **kw))

    def __call__(self, features):
        out = {"forget": self.collator.pad([f["forget"] for f in features])}
        for key in ("retain", "alternate"):
            if key in features[0]:
                out[key] = self.collator.pad([f[key] for f in features])
        if "alternate_index" in features[0]:
            out["alternate_index"] = torch.tensor([int(f["alternate_index"]) for f in features], dtype=torch.long)
        for key in ("ref_logp_sum", "ref_alt_logp_sum"):
            if key in features[0]:
                out[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float64)
        return out


class _WithRef(torch.utils.data.Dataset):
    def __init__(self, ds, ref, alt_ref=None):
        self.ds, self.ref, self.alt_ref = ds, ref, alt_ref

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["ref_logp_sum"] = float(self.ref[i])
        if self.alt_ref is not None:
            item["ref_alt_logp_sum"] = float(self.alt_ref[item["alternate_index"]])
        return item

    def set_epoch(self, epoch):
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)


@torch.no_grad()
def add_reference_logps(dataset, model, collator: DataCollator, batch_size: int = 16):
    """NPO / IdkDPO without a live reference model: score every forget example (and, for a dataset with
    ``alternates``, every alternate candidate) once with ``model`` (the reference, i.e. the model before
    unlearning) and return a dataset whose items carry ``ref_logp_sum`` (and ``ref_alt_logp_sum``)."""
    patch(model)

    def ref_logps(examples):  # every process scores every example (no collective before the Trainer runs)
        return sequence_logps(model, examples, collator, batch_size=batch_size, sharded=False)[:, 0]

    ref = ref_logps([dataset[i]["forget"] for i in range(len(dataset))])
    alts = getattr(dataset, "alternates", None)
    return _WithRef(dataset, ref, None if alts is None else ref_logps(alts))


class UnlearningTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose ``compute_loss`` is the fused unlearning loss on forget/retain batches.

    ``objective`` names a registered method (:func:`simnpo_fast.methods.get_method`); the other keywords build its
    :class:`~simnpo_fast.criterion.UnlearningCriterion` (``self.criterion``). The defaults are the library's (the
    method's ``beta`` / ``gamma`` from the registry, weights 1); :meth:`from_preset` takes a paper setting's instead
    (``tofu_forget10``: beta 4.5, forget weight 0.125, ...)."""

    @classmethod
    def from_preset(cls, name: str, *args, output_dir: Optional[str] = None, **kw) -> "UnlearningTrainer":
        """An ``UnlearningTrainer`` with the loss of the packaged preset ``name`` (:func:`preset_loss_kwargs`) and,
        unless ``args=`` is given, its :func:`preset_training_arguments` (into ``output_dir``, default
        ``runs/<name>``); loss keywords given here win over the preset's."""
        loss = preset_loss_kwargs(name)
        loss.update({k: kw.pop(k) for k in PRESET_LOSS_KEYS if k in kw})
        if "args" not in kw and len(args) < 2:
            kw["args"] = preset_training_arguments(name, output_dir or os.path.join("runs", name))
        return cls(*args, **loss, **kw)

    def __init__(self, *args, objective: str = "simnpo", beta: Optional[float] = None, gamma: Optional[float] = None,
                 forget_weight: float = 1.0, retain_weight: float = 1.0, grad_filter="auto",
                 normalize: str = "token", **kw):
        self.criterion = UnlearningCriterion(objective, forget_weight=forget_weight, retain_weight=retain_weight,
                                             beta=beta, gamma=gamma, grad_filter=grad_filter, normalize=normalize)
        if self.criterion.retain_loss == "kl":
            raise ValueError("UnlearningTrainer has no frozen reference model: use a retain NLL method")
        model = kw.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("UnlearningTrainer needs model=")
        patch(model)
        super().__init__(*args, **kw)
        # our loss takes the step's counts (num_items_in_batch, see get_batch_samples): the Trainer then leaves
        # it undivided by the accumulation steps; without counts it divides a per-batch mean, as for any model
        self.model_accepts_loss_kwargs = True
        self.last_terms: dict = {}

    def _pad_id(self, model) -> int:
        cfg = getattr(model, "config", None)
        pad = getattr(cfg, "pad_token_id", None)
        return 0 if pad is None else int(pad if not isinstance(pad, list) else pad[0])

    def _batch(self, inputs: dict) -> ForgetRetainBatch:
        """The collated ``{"forget", "retain"[, "alternate", ...][, "ref_logp_sum", ...]}`` inputs as one
        forget/retain batch (the retain rows only when the loss has a retain term, the alternate rows only when
        the method has alternates)."""
        retain = inputs.get("retain") if self.criterion.uses_retain else None
        alternate = None
        if self.criterion.method.alternate != "none":
            alternate = inputs.get("alternate")
            if alternate is None:
                raise ValueError(f"objective {self.criterion.objective!r} needs the alternate answer of every forget "
                                 "example: train on data.WithAlternates(...) or data.load_forget_retain(..., idk=True)")
        return ForgetRetainBatch.from_padded(inputs["forget"], retain, self._pad_id(self.model),
                                             ref_logp_sum=inputs.get("ref_logp_sum"), alternate=alternate,
                                             alternate_index=inputs.get("alternate_index"),
                                             ref_alt_logp_sum=inputs.get("ref_alt_logp_sum"))

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kw):
        """One optimizer step's micro-batches and, as ``num_items_in_batch``, its global
        :class:`~simnpo_fast.batch.StepCounts` over the micro-batches and every process. (``*args``: newer
        transformers also pass the device.)"""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kw)
        return batches, self._counts(batches, args[0] if args else kw.get("device"))

    def _counts(self, batches, device=None) -> Optional[StepCounts]:
        if not batches or not all(isinstance(b, dict) and "forget" in b for b in batches):
            return None
        reduce = None
        if self.args.world_size > 1:
            def reduce(c):
                return self.accelerator.gather(c.to(device or self.args.device)).reshape(-1, c.numel()).sum(0)
        return self.criterion.step_counts([self._batch(b) for b in batches], reduce)

    def step_counts(self, batches, device=None) -> Optional[dict]:
        """The step's loss denominators as ``{"forget": forget sequences with an answer token (tokens for GA /
        GradDiff with ``normalize="token"``), "retain": retain answer tokens (retain sequences with
        ``normalize="sequence"``)}``, summed over ``batches`` and every process."""
        c = self._counts(batches, device)
        return None if c is None else {"forget": c.forget, "retain": c.retain}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self._batch(inputs)
        counts = num_items_in_batch if isinstance(num_items_in_batch, StepCounts) else None
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    loss_fn=self.criterion.head_loss(batch, counts))
        self.last_terms = {k: v.detach() for k, v in out.terms.items()}
        loss = out.loss
        if counts is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # the data-parallel gradient reduction is a mean
        return (loss, {"loss": loss}) if return_outputs else loss


#: the loss keywords of :class:`UnlearningTrainer` a preset's ``loss:`` section sets (the config's names)
PRESET_LOSS_KEYS = ("objective", "beta", "gamma", "forget_weight", "retain_weight", "grad_filter", "normalize")


def read_preset(name: str) -> dict:
    """A packaged preset (``simnpo_fast/configs/<name>.yaml``: ``tofu_forget10``, ``muse_news``, ...) as a dict."""
    import yaml

    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    path = os.path.join(folder, f"{name}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
        raise ValueError(f"unknown preset {name!r}; choose one of {names}")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def preset_loss_kwargs(name: str) -> dict:
    """The :class:`UnlearningTrainer` loss keywords of preset ``name`` (its ``loss:`` section)."""
    loss = read_preset(name).get("loss", {})
    return {k: loss[k] for k in PRESET_LOSS_KEYS if k in loss}


def preset_training_arguments(name: str, output_dir: str, *, world_size: int = 1, **overrides):
    """``transformers.TrainingArguments`` of preset ``name``: learning rate, weight decay, clipping, schedule,
    warm-up, steps (or epochs), seed, per-device batch (``micro_batch_size``) and the accumulation that makes the
    preset's global ``batch_size`` over ``world_size`` processes; ``overrides`` win. HF's warm-up starts at 0 (the
    trainer config's ``optim.warmup_from_zero: true``, which the TOFU presets set)."""
    p = read_preset(name)
    o, micro, batch = p.get("optim", {}), int(p.get("micro_batch_size", 4)), int(p.get("batch_size", 32))
    if batch % (micro * world_size):
        raise ValueError(f"preset {name!r}: batch_size {batch} is not a multiple of micro_batch_size {micro} x "
                         f"world_size {world_size}")
    kw = dict(output_dir=output_dir, learning_rate=float(o.get("lr", 1e-5)),
              weight_decay=float(o.get("weight_decay", 0.0)), max_grad_norm=float(o.get("max_grad_norm", 1.0)),
              lr_scheduler_type=o.get("schedule", "linear"), warmup_steps=int(o.get("warmup_steps", 0)),
              seed=int(p.get("seed", 42)), per_device_train_batch_size=micro,
              gradient_accumulation_steps=batch // (micro * world_size), remove_unused_columns=False)
    if int(p.get("max_steps", 0)) > 0:
        kw["max_steps"] = int(p["max_steps"])
    else:
        kw["num_train_epochs"] = float(p.get("epochs", 1))
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)
