"""Models, training, evaluation and unlearning of the Markov-chain study, all through the fused LM-head path.

Every loss and every measurement goes through :class:`simnpo_fast.model.UnlearnModel`: the backbone gives the
final hidden states and the LM head's own forward runs a head loss on them (the project's fused losses).

* Pretraining / retraining: the fused token-mean NLL (:func:`simnpo_fast.model.nll_head`), AdamW without weight
  decay or clipping, constant learning rate (``synthetic/train.py`` of OPTML-Group/Unlearn-Simple).
* Unlearning: :meth:`simnpo_fast.UnlearningLoss.batch_loss` on a :class:`~simnpo_fast.batch.ForgetRetainBatch`, one forget
  and one retain batch per iteration (``synthetic/unlearn.py``, ``synthetic/unlearn_utils.py``): GA = -CE(f),
  GradDiff = -CE(f) + CE(r), NPO = -(2/beta) mean logsigmoid(-beta (logp - logp_ref)), SimNPO =
  -(2/beta) mean logsigmoid(-(beta/n) logp - gamma), "+RT" adds CE(r) with weight 1. NPO's ``logp_ref`` is
  cached from the pretrained model before unlearning (no live reference model).
* Evaluation (``synthetic/evaluate_utils.py: evaluate_with_transitions``): the token mean over the held-out
  targets of ``KL(q(.|s_<=t) || p_model(.|s_<=t))``, where ``q`` is the retrained (retain-only) model or the
  true transition row ``T[s_t]`` of the chain the sequence came from. Both go through the fused
  :func:`simnpo_fast.kl_loss`: the retrained model as its hidden states + LM head, the true chain as
  :class:`TrueChain` (one-hot hidden states, LM head ``log T^T``), so the same code measures both.
* Per-sequence gradient weights: every objective's gradient is ``sum_i w_i * grad logp_sum_i / B`` for a batch
  of ``B`` sequences, with ``w_i = f'(logp_sum_i)`` for the per-sequence objectives (SimNPO:
  ``(2/n_i) sigmoid((beta/n_i) logp_sum_i + gamma)``; NPO: ``2 sigmoid(beta (logp_sum_i - logp_ref_i)))``) and
  ``w_i = 1 / mean length`` for the token-mean GA / GradDiff. ``w_i`` is also the factor on every token's
  logits gradient ``(onehot - softmax)`` of sequence ``i``; ``w_i * n_i`` is the sequence's total push.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..batch import ForgetRetainBatch
from ..errors import NonFiniteError
from ..likelihood import batch_logps, sharded_logps
from ..model import ModelConfig, UnlearnModel, build_hf_model, nll_head
from ..modules import UnlearningLoss
from ..ops import kl_loss, sequence_logprob
from .chains import batch


def build_model(model_cfg: dict, n_states: int, seed: int) -> UnlearnModel:
    """A seeded Llama from ``model_cfg`` (HF ``LlamaConfig`` keys) with one token per state, untied head."""
    cfg = dict(model_type="llama", tie_word_embeddings=False, **model_cfg)
    hf = build_hf_model(ModelConfig(path=None, preset=None, config=cfg, seed=int(seed), attn_implementation="sdpa"),
                        vocab_size=n_states)
    return UnlearnModel(hf)


class TrueChain(nn.Module):
    """A Markov chain as a "model" of the head-loss interface: one-hot hidden states and the LM-head weight
    ``log T^T`` give the logits ``log T[s_t, :]``, so its fused KL to its own chain is exactly 0."""

    def __init__(self, T: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.log(torch.as_tensor(T, dtype=torch.float32)).T.contiguous())

    def forward(self, input_ids, attention_mask=None, loss_fn=None, **kw):
        hidden = F.one_hot(input_ids, self.weight.shape[1]).to(self.weight.dtype)
        return loss_fn(self.weight, None, hidden, **kw) if loss_fn is not None else hidden @ self.weight.T


def _head_inputs(weight, bias, hidden):
    return hidden, weight, bias


def _mask(b: dict) -> Optional[torch.Tensor]:
    """``None`` when nothing is padded (the backbone then skips building a padding mask)."""
    m = b["attention_mask"]
    return None if bool(m.all()) else m


def head_inputs(model: nn.Module, b: dict):
    """``(hidden, lm_head_weight, bias)`` of ``model`` on batch ``b`` (an :class:`UnlearnModel` or a
    :class:`TrueChain`)."""
    return model(b["input_ids"], _mask(b), _head_inputs)


def pretrain(model: UnlearnModel, seqs: Sequence[np.ndarray], *, epochs: int, batch_size: int, lr: float,
             seed: int) -> dict:
    """Plain NLL training on ``seqs`` (fused token-mean NLL, AdamW, constant lr, reshuffled every epoch)."""
    rng = np.random.default_rng([int(seed), 1000])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    steps, last = 0, []
    for ep in range(int(epochs)):
        order = rng.permutation(len(seqs))
        last = []
        for i in range(0, len(order), batch_size):
            b = batch([seqs[j] for j in order[i:i + batch_size]])
            loss, _, _ = model(b["input_ids"], _mask(b), nll_head, labels=b["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            last.append(float(loss.detach()))
    model.eval()
    return {"steps": steps, "last_epoch_loss": float(np.mean(last)) if last else None}


@dataclass
class EvalSet:
    """Held-out sequences of one chain, with the two references' head inputs cached."""

    name: str
    batch: dict
    retrained: tuple
    truth: tuple
    n_tokens: int


@torch.no_grad()
def make_evalset(name: str, seqs: np.ndarray, retrained: nn.Module, T: np.ndarray) -> EvalSet:
    b = batch(list(seqs))
    n_tokens = int((b["labels"][:, 1:] != -100).sum())
    return EvalSet(name, b, head_inputs(retrained, b), head_inputs(TrueChain(T), b), n_tokens)


@torch.no_grad()
def evaluate(model: nn.Module, sets: Sequence[EvalSet]) -> Dict[str, dict]:
    """Per set: ``kl_retrain``, ``kl_true`` (token means, nats) and the per-sequence ``logp`` / ``n`` [B]."""
    out = {}
    for s in sets:
        h, w, bias = head_inputs(model, s.batch)
        labels = s.batch["labels"]
        rh, rw, rb = s.retrained
        th, tw, _ = s.truth
        logp, n = sequence_logprob(h, w, labels, bias=bias)
        out[s.name] = {"kl_retrain": float(kl_loss(h, w, labels, rh, rw, bias=bias, ref_bias=rb)),
                       "kl_true": float(kl_loss(h, w, labels, th, tw, bias=bias)),
                       "logp": logp.double(), "n": n, "tokens": s.n_tokens}
    return out


def make_criterion(spec: dict) -> UnlearningLoss:
    """The study's method spec (``objective``, ``beta``, ``gamma``, ``retain_weight``) as the project's loss."""
    return UnlearningLoss(spec["objective"], forget_weight=float(spec.get("forget_weight", 1.0)),
                          retain_weight=float(spec.get("retain_weight", 0.0)), beta=spec.get("beta"),
                          gamma=float(spec.get("gamma", 0.0)))


def sequence_weights(criterion: UnlearningLoss, logp: torch.Tensor, n: torch.Tensor, *,
                     ref_logp: Optional[torch.Tensor], mean_len: float) -> torch.Tensor:
    """``w_i``: the weight of ``grad logp_sum_i`` in the forget gradient of a ``B``-sequence batch, times ``B``
    (derivative of the criterion's own per-sequence objective; token-mean objectives: ``f'_i / mean_len``)."""
    obj = criterion.forget_objective
    with torch.enable_grad():
        x = logp.detach().double().requires_grad_(True)
        extra = {"ref_logp_sum": ref_logp.double()} if criterion.method.reference == "logp" else {}
        (g,) = torch.autograd.grad(obj(x, n, **extra).sum(), x)
    return g if obj.per == "sequence" else g / float(mean_len)


@dataclass
class UnlearnData:
    """The forget / retain training sequences, the shared batch schedule and the NPO reference cache."""

    forget: List[np.ndarray]
    retain: List[np.ndarray]
    schedule: List[tuple]  # per iteration: (forget indices, retain indices)
    ref_logp: Dict[int, float]
    mean_forget_len: float


@torch.no_grad()
def cache_ref_logp(model: UnlearnModel, forget: List[np.ndarray], idx: Sequence[int],
                   bs: int = 256) -> Dict[int, float]:
    """Summed target log-likelihood of the forget sequences ``idx`` under ``model`` (NPO's reference)."""
    idx = sorted(set(int(i) for i in idx))

    def score(ks):
        b = batch([forget[idx[k]] for k in ks])
        return batch_logps(model, dict(b, attention_mask=_mask(b)))

    lp = sharded_logps(score, len(idx), bs)
    return {i: float(lp[k, 0]) for k, i in enumerate(idx)}


def make_schedule(n_forget: int, n_retain: int, iterations: int, batch_size: int, seed: int) -> List[tuple]:
    """Forget / retain indices of every iteration (reshuffled when a pass ends); shared by all methods."""
    rng = np.random.default_rng([int(seed), 2000])
    streams = {}
    for key, n in (("f", n_forget), ("r", n_retain)):
        order = np.concatenate([rng.permutation(n) for _ in range(-(-iterations * batch_size // n))])
        streams[key] = order[: iterations * batch_size].reshape(iterations, batch_size)
    return [(streams["f"][i].tolist(), streams["r"][i].tolist()) for i in range(iterations)]


def record(ev: Dict[str, dict], criterion: UnlearningLoss, probe_ref: Dict[str, torch.Tensor],
           mean_len: float) -> dict:
    """One point of a trajectory: both KLs per chain, the token-pooled forget KL (the reference's "Forget
    Test" set), the mean weight ``w`` on each forget chain's held-out sequences and forget1's share of the
    total push ``sum_i w_i n_i`` of the two (equal numbers of probe sequences)."""
    rec = {}
    for name, e in ev.items():
        rec[f"kl_retrain/{name}"] = e["kl_retrain"]
        rec[f"kl_true/{name}"] = e["kl_true"]
    f1, f2 = ev["forget1"], ev["forget2"]
    for kind in ("kl_retrain", "kl_true"):
        rec[f"{kind}/forget"] = (f1[kind] * f1["tokens"] + f2[kind] * f2["tokens"]) / (f1["tokens"] + f2["tokens"])
    push = {}
    for name in ("forget1", "forget2"):
        e = ev[name]
        w = sequence_weights(criterion, e["logp"], e["n"], ref_logp=probe_ref[name], mean_len=mean_len)
        rec[f"weight/{name}"] = float(w.mean())
        push[name] = float((w * e["n"].double()).sum())
    rec["push_share/forget1"] = push["forget1"] / max(push["forget1"] + push["forget2"], 1e-300)
    return rec


def unlearn(model: UnlearnModel, spec: dict, data: UnlearnData, sets: Sequence[EvalSet],
            probe_ref: Dict[str, torch.Tensor], *, lr: float, eval_every: int, eval_dense: int = 0) -> List[dict]:
    """Unlearn ``model`` in place with method ``spec`` over ``data.schedule``; evaluate at iteration 0, at every
    iteration up to ``eval_dense`` (where the trajectories turn), then every ``eval_every`` iterations and at
    the end. Returns the trajectory (a list of :func:`record` points)."""
    criterion = make_criterion(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def point(it: int) -> dict:
        model.eval()
        return {"iteration": it, **record(evaluate(model, sets), criterion, probe_ref, data.mean_forget_len)}

    history = [point(0)]
    for it, (fi, ri) in enumerate(data.schedule, 1):
        model.train()
        f = [data.forget[i] for i in fi]
        r = [data.retain[i] for i in ri] if criterion.retain_weight > 0 else []
        b = batch(f + r)
        ref = None
        if criterion.method.reference == "logp":
            ref = torch.tensor([data.ref_logp[i] for i in fi], dtype=torch.float32)
        fr = ForgetRetainBatch(b["input_ids"], b["attention_mask"], b["labels"], len(f), ref_logp_sum=ref)
        out = model(fr.input_ids, _mask(b), functools.partial(criterion.batch_loss, batch=fr))
        if not torch.isfinite(out.loss):
            raise NonFiniteError(f"{spec}: non-finite unlearning loss at iteration {it}")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if it <= eval_dense or it % eval_every == 0 or it == len(data.schedule):
            history.append(point(it))
    return history
