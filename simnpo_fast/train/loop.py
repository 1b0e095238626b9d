"""The loop of one training stage: start (fresh or from a verified checkpoint), steps, checkpoints, finish.

    run = setup(cfg)
    result = run_loop(run, folder, requested)       # folder: the claimed run folder (train.run_folder.open_run)

A fresh start evaluates the model first (``evaluate``) and, for a method with ``reference == "logp"`` (NPO,
IdkDPO), caches the reference log-likelihood of every forget example and of every alternate answer candidate
(the model before the first step is the reference; the cache is stored in every checkpoint, so no reference
model is kept). Every ``checkpoint.every``
steps and at the end a verified checkpoint is written; a non-finite step stops the run naming the last one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..distributed import barrier
from ..errors import NonFiniteError, Preempted
from ..likelihood import mean_loglik, sequence_logps
from .checkpoint import export_hf, load_checkpoint, save_checkpoint
from .config_io import config_yaml, save_config
from .run_log import JsonlLogger, plot_curves, progress
from .preempt import PreemptionGuard
from .setup import Run
from .step import train_step


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    records: List[dict]
    eval_before: Dict[str, float]
    eval_after: Dict[str, float]
    checkpoint: Optional[str]
    hf_dir: Optional[str]
    run_id: Optional[str] = None


def _collator(run: Run):
    from ..data import DataCollator

    return DataCollator.from_tokenizer(run.tokenizer)


def evaluate(run: Run) -> Dict[str, float]:
    """Mean answer log-likelihood per token of the forget set (and of the retain set when loaded)."""
    col, dev = _collator(run), run.info.device
    out = {"forget_loglik": mean_loglik(run.model, run.forget, col, dev)}
    if run.retain is not None:
        out["retain_loglik"] = mean_loglik(run.model, run.retain, col, dev)
    return out


def start(run: Run, folder) -> Dict[str, float]:
    """Resume from ``folder.resume_from`` (model, optimizer, schedule, stream position, step, reference cache)
    or start fresh (evaluation, reference cache). Returns the evaluation before training."""
    if folder.resume_from:
        state, tensors = load_checkpoint(folder.resume_from, run.model, run.optimizer, manifest=folder.manifest)
        run.scheduler.load_state_dict(state["scheduler"])
        run.stream.load_state_dict(state["sampler"])
        run.step = int(state["step"])
        run.ref_logp = tensors.get("ref_logp")
        run.ref_alt_logp = tensors.get("ref_alt_logp")
        return state.get("eval_before", {})
    eval_before = evaluate(run) if run.cfg.evaluate else {}
    if run.criterion.method.reference == "logp":
        # fp64 cache (B numbers): as exact as the model's own log-likelihoods, whatever its dtype
        run.ref_logp = sequence_logps(run.model, run.forget, _collator(run), run.info.device)[:, 0].double()
        if run.alternates is not None:
            run.ref_alt_logp = sequence_logps(run.model, run.alternates, _collator(run), run.info.device)[:, 0].double()
    return eval_before


def save(run: Run, folder, requested: dict, eval_before: dict) -> str:
    """A checkpoint of the current step (collective)."""
    cfg = run.cfg
    st = {"step": run.step, "sampler": run.stream.state_dict(), "scheduler": run.scheduler.state_dict(),
          "eval_before": eval_before, "name": cfg.name, "config": requested}
    tens = {k: v for k, v in (("ref_logp", run.ref_logp), ("ref_alt_logp", run.ref_alt_logp)) if v is not None}
    return save_checkpoint(folder.checkpoints, run.step, run.model, run.optimizer, state=st, tensors=tens,
                           keep=cfg.checkpoint.keep, run_id=folder.run_id, files={"config.yaml": config_yaml(cfg)})


def _steps(run: Run, folder, requested: dict, eval_before: dict, hooks: Optional[dict]) -> tuple:
    """The steps up to ``total_steps``: log, progress, periodic checkpoints, heartbeat, ``after_step`` hook.
    Returns ``(records, last checkpoint)``."""
    cfg, info = run.cfg, run.info
    logger = JsonlLogger(os.path.join(cfg.output_dir, "log.jsonl"), enabled=info.is_main,
                         append=bool(folder.resume_from), truncate_after=run.step)
    bar = progress(total=run.total_steps, initial=run.step, enabled=info.is_main and cfg.progress,
                   desc=cfg.loss.objective)
    last_ck, records = folder.resume_from, []
    try:
        with PreemptionGuard() as guard:
            while run.step < run.total_steps:
                try:
                    rec = train_step(run, run.stream.next_step(), hooks).as_dict()
                except NonFiniteError as e:
                    raise NonFiniteError(f"{e}. Last good checkpoint: {last_ck or 'none written yet'}") from None
                records.append(rec)
                folder.started = True
                if run.step % max(1, cfg.log_every) == 0 or run.step == run.total_steps:
                    logger.write(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", fll=f"{rec['forget_loglik']:.3f}")
                if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0 and run.step < run.total_steps:
                    last_ck = save(run, folder, requested, eval_before)
                folder.heartbeat()
                if hooks and "after_step" in hooks:
                    hooks["after_step"](run, run.step)
                received = guard.agreed(run.info.device)
                if received:
                    last_ck = _preempted(run, folder, requested, eval_before, last_ck, received)
    finally:
        bar.close()
        logger.close()
    return records, last_ck


def _preempted(run: Run, folder, requested: dict, eval_before: dict, last_ck: Optional[str], received: str):
    """Checkpoint the step just finished (unless it is checkpointed already or the stage keeps no checkpoints)
    and raise :class:`Preempted` (collective: every rank got the same ``received`` truth value)."""
    ck = run.cfg.checkpoint
    keeps = bool(ck.every or ck.final)
    if keeps and not (last_ck and os.path.basename(last_ck) == f"step_{run.step:08d}"):
        last_ck = save(run, folder, requested, eval_before)
    if keeps:
        raise Preempted(f"{received} received: stopped after step {run.step} of {run.total_steps} with the "
                        f"checkpoint {last_ck}; rerun with --resume (or --resume=auto) to continue")
    raise Preempted(f"{received} received: stopped after step {run.step} of {run.total_steps} of "
                    f"{run.cfg.name}, a stage that keeps no checkpoints: a rerun starts it again")


def run_loop(run: Run, folder, requested: dict, hooks: Optional[dict] = None) -> TrainResult:
    """Train ``run`` in the claimed ``folder`` to its last step and finish: final checkpoint, evaluation, HF
    export, ``eval.json`` and the curves. ``requested``: the config the folder's run was asked for (stored in
    every checkpoint). Hooks: ``after_backward(run, s)`` before update ``s``, ``after_step(run, s)`` after step
    ``s`` is logged and checkpointed."""
    cfg, out = run.cfg, run.cfg.output_dir
    if run.info.is_main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    eval_before = start(run, folder)
    records, last_ck = _steps(run, folder, requested, eval_before, hooks)
    if cfg.checkpoint.final:
        last_ck = save(run, folder, requested, eval_before)
    eval_after = evaluate(run) if cfg.evaluate else {}
    hf_dir = export_hf(run.model, os.path.join(out, "hf"), run.tokenizer) if cfg.checkpoint.export_hf else None
    if run.info.is_main:
        with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"before": eval_before, "after": eval_after, "steps": run.step, "run_id": folder.run_id},
                      f, indent=1)
        if cfg.plot:
            plot_curves(os.path.join(out, "log.jsonl"), os.path.join(out, "curves.png"), title=cfg.name)
    barrier()
    return TrainResult(out, run.step, records, eval_before, eval_after, last_ck, hf_dir, folder.run_id)
