"""Drop-in for HF Trainer / accelerate users: fused SimNPO / NPO / GA / GradDiff without full logits.

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
is kept).
"""
from __future__ import annotations

from typing import Optional

import torch
import transformers

from .data import DataCollator
from .model import logprob_task, patch, unlearn_task
from .modules import UnlearningLoss


def _cat_pad(a: dict, b: Optional[dict], pad_id: int) -> tuple:
    if b is None:
        return a["input_ids"], a["attention_mask"], a["labels"]
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

    ids = torch.cat([pad(a["input_ids"], pad_id), pad(b["input_ids"], pad_id)])
    mask = torch.cat([pad(a["attention_mask"], 0), pad(b["attention_mask"], 0)])
    labels = torch.cat([pad(a["labels"], -100), pad(b["labels"], -100)])
    return ids, mask, labels


class ForgetRetainCollator:
    """``[{"forget": ex, "retain": ex[, "ref_logp_sum": float]}]`` -> ``{"forget": {...}, "retain": {...}
    [, "ref_logp_sum": [B]]}`` (right padding by lengths)."""

    def __init__(self, collator: DataCollator):
        self.collator = collator

    @classmethod
    def from_tokenizer(cls, tokenizer, **kw) -> "ForgetRetainCollator":
        return cls(DataCollator.from_tokenizer(tokenizer, **kw))

    def __call__(self, features):
        out = {"forget": self.collator.pad([f["forget"] for f in features])}
        if "retain" in features[0]:
            out["retain"] = self.collator.pad([f["retain"] for f in features])
        if "ref_logp_sum" in features[0]:
            out["ref_logp_sum"] = torch.tensor([float(f["ref_logp_sum"]) for f in features], dtype=torch.float32)
        return out


class _WithRef(torch.utils.data.Dataset):
    def __init__(self, ds, ref):
        self.ds, self.ref = ds, ref

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["ref_logp_sum"] = float(self.ref[i])
        return item

    def set_epoch(self, epoch):
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)


@torch.no_grad()
def add_reference_logps(dataset, model, collator: DataCollator, batch_size: int = 16):
    """NPO without a live reference model: score every forget example once with ``model`` (the reference, i.e.
    the model before unlearning) and return a dataset whose items carry ``ref_logp_sum``."""
    patch(model)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    ref = torch.zeros(len(dataset))
    for s in range(0, len(dataset), batch_size):
        idx = list(range(s, min(len(dataset), s + batch_size)))
        b = collator.pad([dataset[i]["forget"] for i in idx])
        logp, _ = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                        head_task=logprob_task(), task_kwargs={"labels": b["labels"].to(dev)})
        ref[idx] = logp.float().cpu()
    model.train(was)
    return _WithRef(dataset, ref)


class UnlearningTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose ``compute_loss`` is the fused unlearning loss on forget/retain batches."""

    def __init__(self, *args, objective: str = "simnpo", beta: Optional[float] = None, gamma: float = 0.0,
                 forget_weight: float = 1.0, retain_weight: float = 1.0, **kw):
        self.criterion = UnlearningLoss(objective, forget_weight=forget_weight, retain_weight=retain_weight,
                                        beta=beta, gamma=gamma)
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

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kw):
        """One optimizer step's micro-batches and, as ``num_items_in_batch``, its global loss denominators:
        ``{"forget": forget sequences with an answer token (tokens for GA / GradDiff), "retain": retain answer
        tokens}``, summed over the micro-batches and every process. (``*args``: newer transformers also pass
        the device.)"""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kw)
        return batches, self.step_counts(batches, args[0] if args else kw.get("device"))

    def step_counts(self, batches, device=None) -> Optional[dict]:
        if not batches or not all(isinstance(b, dict) and "forget" in b for b in batches):
            return None
        c = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            c[0] += self.criterion.forget_objective.denominator((b["forget"]["labels"][:, 1:] != -100).sum(1))
            if self.criterion.retain_weight > 0 and b.get("retain") is not None:
                c[1] += int((b["retain"]["labels"][:, 1:] != -100).sum())
        if self.args.world_size > 1:
            c = self.accelerator.gather(c.to(device or self.args.device)).reshape(-1, 2).sum(0).cpu()
        return {"forget": float(c[0]), "retain": float(c[1])}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs["forget"]
        retain = inputs.get("retain") if self.criterion.retain_weight > 0 else None
        ids, mask, labels = _cat_pad(forget, retain, self._pad_id(self.model))
        kw = {"n_forget": forget["input_ids"].shape[0], "labels": labels}
        if "ref_logp_sum" in inputs:
            kw["ref_logp_sum"] = inputs["ref_logp_sum"]
        counts = num_items_in_batch if isinstance(num_items_in_batch, dict) else None
        if counts is not None:
            if counts["forget"] > 0:
                kw["forget_normalizer"] = counts["forget"]
            if counts["retain"] > 0:
                kw["retain_normalizer"] = counts["retain"]
        out = model(input_ids=ids, attention_mask=mask, head_task=unlearn_task(self.criterion), task_kwargs=kw)
        self.last_terms = {k: v.detach() for k, v in out.terms.items()}
        loss = out.loss
        if counts is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # the data-parallel gradient reduction is a mean
        return (loss, {"loss": loss}) if return_outputs else loss
