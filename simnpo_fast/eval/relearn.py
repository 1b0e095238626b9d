"""The relearning attack (Hu et al., 2024, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning";
the SimNPO paper's robustness test): fine-tune an unlearned model with plain NLL on a small seeded subset of
the forget set for ``steps`` optimizer steps, and measure the forget metrics before and after. A method whose
forget metrics bounce back to the finetuned model's after a few steps only hid the knowledge.

The fine-tuning loop is deliberately plain (AdamW, constant LR, fused NLL via :func:`simnpo_fast.nll_loss`, no
logits held) and deterministic for a given seed; under ``torch.distributed`` every rank runs the same loop on the
same batches (the subset is tiny), then the evaluation is sharded as usual.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from ..data import DataCollator, encode_qa, load_tofu
from ..model import final_hidden
from ..ops import nll_loss
from .runner import head_params, model_device, pad_id_of, unwrap
from .tofu import TofuEvalConfig, evaluate_tofu


@dataclass
class RelearnConfig:
    n_examples: int = 20  # forget examples the attacker holds (seeded choice)
    steps: int = 10
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd
    max_length: int = 512
    template: Optional[str] = None


def relearn_subset(n_total: int, n: int, seed: int) -> list[int]:
    """The attacker's forget rows: ``n`` distinct rows drawn with ``numpy.random.default_rng(seed)`` (sorted)."""
    if not 0 <= n <= n_total:
        from ..errors import ConfigError

        raise ConfigError(f"asked for {n} relearning examples but the forget split has {n_total}")
    return sorted(np.random.default_rng(seed).choice(n_total, size=n, replace=False).tolist())


def finetune_nll(model, examples, cfg: RelearnConfig, pad_id: int, *, progress: bool = False) -> list[float]:
    """``cfg.steps`` AdamW steps of token-mean NLL on ``examples`` (cycled in a seeded order); returns the losses."""
    if cfg.steps > 0 and (len(examples) == 0 or cfg.batch_size < 1):
        raise ValueError(f"relearning needs at least one example and batch_size >= 1 (got {len(examples)} "
                         f"examples, batch_size {cfg.batch_size})")
    model = unwrap(model)
    dev = model_device(model)
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
    order: list[int] = []
    losses = []
    it = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="relearn", leave=False)
    was = model.training
    model.train()
    for _ in it:
        while len(order) < cfg.batch_size:
            order += torch.randperm(len(examples), generator=g).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = {k: t.to(dev) for k, t in DataCollator(pad_id).pad([examples[i] for i in idx]).items()}
        h = final_hidden(model, batch["input_ids"], batch["attention_mask"])
        w, b = head_params(model)
        loss = nll_loss(h, w, batch["labels"], bias=b)
        if not torch.isfinite(loss.detach()):
            from ..errors import NonFiniteError

            raise NonFiniteError(f"relearning step {len(losses) + 1}: non-finite loss ({float(loss.detach())}) "
                                 f"at lr {cfg.lr}")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.train(was)
    return losses


def relearn_attack(model, tokenizer, data_dir: str, cfg: Optional[RelearnConfig] = None, *,
                   eval_cfg: Optional[TofuEvalConfig] = None, reference=None, in_place: bool = False,
                   progress: bool = False) -> dict:
    """Forget metrics of ``model`` before and after relearning on ``cfg.n_examples`` forget rows.

    Returns ``{"config", "rows", "losses", "before": tofu result, "after": tofu result}``. The model is copied
    first unless ``in_place``."""
    cfg = cfg or RelearnConfig()
    eval_cfg = eval_cfg or TofuEvalConfig(sets=("forget",))
    model = unwrap(model)
    if not in_place:
        model = copy.deepcopy(model)
    before = evaluate_tofu(model, tokenizer, data_dir, copy.deepcopy(eval_cfg), reference=reference,
                           progress=progress)
    ds = load_tofu(data_dir, eval_cfg.forget_split)
    rows = relearn_subset(len(ds), cfg.n_examples, cfg.seed)
    enc = encode_qa(ds.select(rows), tokenizer, template=cfg.template or eval_cfg.template,
                    max_length=cfg.max_length, source=os.path.join(data_dir, eval_cfg.forget_split))
    losses = finetune_nll(model, [enc[i] for i in range(len(enc))], cfg, pad_id_of(tokenizer), progress=progress)
    after = evaluate_tofu(model, tokenizer, data_dir, copy.deepcopy(eval_cfg), reference=reference,
                          progress=progress)
    return {"task": "relearn", "config": asdict(cfg), "forget_split": eval_cfg.forget_split, "rows": rows,
            "losses": losses, "before": before, "after": after}
