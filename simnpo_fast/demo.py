"""`make demo`: the main job on the embedded default, no downloads, CPU only.

1. generate the fictitious-author corpus (TOFU layout) and train its BPE tokenizer;
2. finetune a tiny Llama on all of it (the *target*) and a retain-only twin (the forget-quality reference);
3. unlearn forget10 from the target with SimNPO (fused loss, FSDP2 trainer), evaluating every few steps;
4. evaluate target, retain and unlearned models with the TOFU metrics (the reference code's definitions,
   ``eval.protocol`` of the config, default ``tofu``) and print the table, plus where the report, the plots and
   the unlearned HF model were written.

Sizes and hyper-parameters: ``simnpo_fast/configs/demo.yaml``. :func:`run_demo` runs it; the command is
``simnpo-fast demo --out DIR`` (:mod:`simnpo_fast.cli.demo`). The fused-loss showcase (full logits vs the chunked
backend: agreement, time, largest tensor held) is :func:`showcase` (``--showcase``).
"""
from __future__ import annotations

import copy
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel() * t.element_size())
        return out


def showcase(B=8, T=256, d=512, V=32000, beta=2.5, seed=0) -> dict:
    """SimNPO loss + gradients with the full-logits reference and the fused chunked backend (agreement, time,
    largest tensor held)."""
    import simnpo_fast as sf
    from simnpo_fast.synthetic_batch import lm_batch

    h, W, labels = lm_batch(B, T, d, V, seed=seed)
    h.requires_grad_()
    W.requires_grad_()
    out = {}
    for backend in ("reference", "chunked"):
        h.grad = W.grad = None
        with _Largest() as probe:
            t0 = time.perf_counter()
            loss = sf.simnpo_loss(h, W, labels, beta=beta, backend=backend)
            loss.backward()
            dt = time.perf_counter() - t0
        out[backend] = dict(loss=float(loss.detach()), gW=W.grad.clone(), gh=h.grad.clone(), seconds=dt,
                            largest_mib=probe.numel / 2**20)
    s, n = sf.sequence_logprob(h.detach(), W.detach(), labels)
    out["mean_logp"] = float(s.sum() / n.sum())
    return out


def print_showcase() -> None:
    res = showcase()
    print(f"{'backend':<10} {'loss':>12} {'fwd+bwd s':>10} {'largest tensor MiB':>20}")
    for name in ("reference", "chunked"):
        r = res[name]
        print(f"{name:<10} {r['loss']:12.6f} {r['seconds']:10.2f} {r['largest_mib']:20.1f}")


def run_demo(out_dir: str = "demo_out", config: str = "demo", overrides=None, with_showcase: bool = False) -> int:
    """The demo of the module docstring; the unlearning method is the first (in the committed config, the only)
    label of the config's ``unlearn.methods``."""
    from .eval import evaluate_tofu
    from .eval.hook import EvalHook
    from .eval.result_files import text_table, write_report
    from .eval.tofu import summarize
    from .studies import load_study_config
    from .studies.tofu import (eval_config, finetune_stage, finish, load_hf, prepare_corpus, retain_split,
                               set_threads, unlearn_stage, variant)

    t0 = time.perf_counter()
    cfg = load_study_config(config, overrides)
    set_threads(cfg)
    out_dir = os.path.abspath(out_dir)
    seed = int(cfg.get("seed", 0))
    label = next(iter(cfg["unlearn"]["methods"]))
    method = variant(cfg, label)[0].name
    print(f"simnpo-fast demo -> {out_dir}")
    print("[1/5] corpus + tokenizer", flush=True)
    corpus = prepare_corpus(cfg, out_dir)
    print("[2/5] finetune the target model on the full corpus (+ real-authors / world-facts QA)", flush=True)
    target = finetune_stage(cfg, corpus, os.path.join(out_dir, "target"), "pretrain_full", seed)
    finish(target)
    print(f"[3/5] finetune the retain-only model ({retain_split(cfg)})", flush=True)
    retain = finish(finetune_stage(cfg, corpus, os.path.join(out_dir, "retain"), f"pretrain_{retain_split(cfg)}",
                                   seed))
    print(f"[4/5] evaluate retain + target, then unlearn {cfg['forget_split']} with {label} (evaluated during "
          "training)", flush=True)
    ecfg, tok, data_dir = eval_config(cfg), corpus.tokenizer, corpus.data_dir
    ref = evaluate_tofu(load_hf(retain), tok, data_dir, copy.deepcopy(ecfg), progress=True)
    summarize(ref, ref)
    before = evaluate_tofu(load_hf(target.hf_dir), tok, data_dir, copy.deepcopy(ecfg), reference=ref, progress=True)
    every = int(cfg.get("eval", {}).get("every", 0))
    hook = EvalHook(data_dir, tok, every, copy.deepcopy(ecfg), reference=ref,
                    out_path=os.path.join(out_dir, "report", "history.json")) if every else None
    hf = finish(unlearn_stage(cfg, label, target, corpus, os.path.join(out_dir, method), seed), hook=hook)
    print("[5/5] evaluate the unlearned model", flush=True)
    after = evaluate_tofu(load_hf(hf), tok, data_dir, copy.deepcopy(ecfg), reference=ref, progress=True)
    history = None
    if hook is not None:
        steps = _train_steps(os.path.join(out_dir, method))
        history = [h for h in hook.history if h["step"] < steps] + [{"step": steps, "summary": after["summary"]}]
    paths = write_report({"target": before, "retain": ref, method: after}, os.path.join(out_dir, "report"),
                         title=f"demo: {label} on {cfg['forget_split']}", history=history)
    rows = {"target (before)": before["summary"], "retain (oracle)": ref["summary"],
            f"{label} (after)": after["summary"]}
    _print_end(text_table(rows), ecfg.protocol, paths, hf, time.perf_counter() - t0)
    if with_showcase:
        print_showcase()
    return 0


def _print_end(table: str, protocol: str, paths: dict, hf: str, seconds: float) -> None:
    print()
    print(table)
    print()
    print(f"metrics:         the TOFU reference code's (protocol {protocol!r}: truth ratio = geometric mean, "
          f"forget TR = mean min(R, 1/R), forget quality = KS p-value vs the retain model)")
    print(f"report:          {paths['markdown']}")
    print(f"plots:           {paths['plot']}" + (f", {paths['curves']}" if "curves" in paths else ""))
    print(f"unlearned model: {hf}  (AutoModelForCausalLM.from_pretrained)")
    print(f"total time:      {seconds:.0f} s")


def _train_steps(run_dir: str) -> int:
    import json

    last = 0
    p = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(p):
        with open(p) as f:
            for line in f:
                if line.strip():
                    last = max(last, int(json.loads(line).get("step", 0)))
    return last
