"""Stage 3 of ``make gpu-check``: unlearning a ~1B-parameter Llama on one GPU, this trainer against HF ``Trainer``
with the naive full-logits SimNPO that unlearning frameworks write: tokens/s and peak memory.

    python -m bench.gpu_unlearn                         # CUDA: both variants in fresh processes, JSON to bench/results
    python -m bench.gpu_unlearn --dry-run               # CPU: a tiny Llama, 3 steps (the code path, not a result)
    python -m bench.gpu_unlearn --worker --variant ours # one variant; its JSON is the last stdout line

Model: a Llama built from a config (default the ``llama-3.2-1b`` shape of :data:`simnpo_fast.model.PRESET_CONFIGS`:
1.24 B parameters, V=128256, tied embeddings), random weights from seed 0, so both variants start from the same model.
Batch (``bench.step._batch``, the same every step): ``B`` forget + ``B`` retain sequences of ``T`` tokens, the
first ``prompt`` tokens masked, right padding. Both variants: fp32 master weights, bf16 compute, activation
checkpointing of every decoder layer, AdamW (lr 1e-5), gradient clipping at 1.0.

* ``ours``: the FSDP2 trainer's step (:func:`simnpo_fast.train.train_step`) at world size 1: ``apply_ac``,
  ``apply_fsdp`` with the bf16 ``MixedPrecisionPolicy`` (reduce in fp32), forget and retain rows in one backbone
  pass, fused SimNPO + retain NLL inside the LM head's forward (no logits).
* ``hf``: ``transformers.Trainer(bf16=True, gradient_checkpointing=True).train()`` whose ``compute_loss`` is
  ``model(forget).logits`` -> fp32 ``log_softmax`` -> gather -> SimNPO, plus ``model(**retain).loss``.

Measured over ``--steps`` optimizer steps: the first ``--warmup`` are not timed; tokens/s = non-padding tokens per
step / median step time; peak = ``torch.cuda.max_memory_allocated`` over the timed steps (reset after the warm-up;
weights, gradients and optimizer states included), next to the memory allocated before them. ``loss_step1`` of
both variants computes the same objective on the same weights (a sanity check of the comparison, bf16-rounded).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

from bench.harness import emit, result_header, run_worker, write_result

#: the dry run's model (CPU, seconds): same code path, tiny shapes
DRY_MODEL = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True)
BETA = 2.5


def model_shape(name: str) -> dict:
    """A preset of :data:`simnpo_fast.model.PRESET_CONFIGS` (its shape keys), ``"dry"``, or a JSON dict of LlamaConfig
    fields."""
    from simnpo_fast.model import PRESET_CONFIGS
    from simnpo_fast.plan import SHAPE_KEYS

    if name == "dry":
        return dict(DRY_MODEL)
    if name in PRESET_CONFIGS:
        return {k: v for k, v in PRESET_CONFIGS[name].items() if k in SHAPE_KEYS}
    return json.loads(name)


def build_model(shape: dict, device: str):
    """A randomly initialised ``LlamaForCausalLM`` (seed 0, fp32) on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def batches(args):
    """``(forget, retain)`` dicts of ``bench.step._batch`` (ids, mask, labels) for this shape."""
    from bench.step import _batch

    a = SimpleNamespace(B=args.B, T=args.T, V=model_shape(args.model)["vocab_size"], prompt=args.prompt)
    return _batch(a, 1), _batch(a, 2)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> int:
    import torch

    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak(device: str):
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def run_ours(args, device: str) -> dict:
    """The FSDP2 trainer's step, ``args.steps`` times; per-step times, the first loss, memory."""
    import torch

    from simnpo_fast.batch import ForgetRetainBatch
    from simnpo_fast.criterion import UnlearningCriterion
    from simnpo_fast.distributed import apply_ac, apply_fsdp, init_distributed, mixed_precision_policy
    from simnpo_fast.model import UnlearnModel
    from simnpo_fast.train import StepContext, train_step

    info = init_distributed(device)
    model = UnlearnModel(build_model(model_shape(args.model), device))
    apply_ac(model)
    apply_fsdp(model, mp_policy=mixed_precision_policy(info.device, "bf16"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    crit = UnlearningCriterion("simnpo", beta=BETA, gamma=0.0, forget_weight=1.0, retain_weight=1.0)
    ctx = StepContext(model=model, criterion=crit, optimizer=opt, device=info.device, max_grad_norm=1.0)
    f, r = batches(args)
    batch = ForgetRetainBatch(*(torch.cat([f[k], r[k]]) for k in ("input_ids", "attention_mask", "labels")),
                              n_forget=args.B, index=torch.arange(args.B))
    times, losses, base = [], [], 0
    for s in range(args.steps):
        if s == args.warmup:
            base = _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        rec = train_step(ctx, [batch])
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(rec.loss)
    return {"times_s": times, "losses": losses, "tokens_per_step": int(batch.attention_mask.sum()),
            "allocated_before_timed_bytes": base, "peak_bytes": _peak(device)}


def run_hf(args, device: str, tmp: str) -> dict:
    """``transformers.Trainer.train()`` with the naive SimNPO ``compute_loss``; a callback times every step."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from bench.methods import naive_simnpo_trainer

    NaiveSimNPOTrainer = naive_simnpo_trainer(beta=BETA, gamma=0.0)

    out = {"times_s": [], "losses": [], "allocated_before_timed_bytes": 0}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                out["allocated_before_timed_bytes"] = _reset_peak(device)
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _sync(device)
            out["times_s"].append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                out["losses"].append(float(logs["loss"]))

    model = build_model(model_shape(args.model), device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    f, r = batches(args)
    targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=1, learning_rate=1e-5, max_grad_norm=1.0,
                              max_steps=args.steps, lr_scheduler_type="constant", bf16=True, logging_steps=1,
                              report_to=[], use_cpu=device != "cuda", save_strategy="no",
                              remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    tr = NaiveSimNPOTrainer(model=model, args=targs, train_dataset=[0] * args.steps,
                            data_collator=lambda items: {"forget": dict(f), "retain": dict(r)},
                            callbacks=[Clock()])
    tr.train()
    out["tokens_per_step"] = int(f["attention_mask"].sum() + r["attention_mask"].sum())
    out["peak_bytes"] = _peak(device)
    return out


def worker(args) -> dict:
    import tempfile

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    res = run_ours(args, device) if args.variant == "ours" else run_hf(args, device, tempfile.mkdtemp())
    timed = res["times_s"][args.warmup:] or res["times_s"]
    med = statistics.median(timed)
    shape = model_shape(args.model)
    from simnpo_fast.plan import ModelShape

    return {"variant": args.variant, "device": device, "model": shape, "params": ModelShape(**shape).params(),
            "activation_checkpointing": True, "B": args.B, "T": args.T, "steps": args.steps, "warmup": args.warmup,
            "median_step_s": med, "tokens_per_s": res["tokens_per_step"] / med,
            "loss_step1": res["losses"][0] if res["losses"] else None, **res}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="ours", choices=["ours", "hf"])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 3 steps: the code path only")
    p.add_argument("--model", default=None, help="preset name or JSON LlamaConfig fields (default llama-3.2-1b)")
    p.add_argument("--B", type=int, default=None, help="forget sequences per step, as many retain (default 8)")
    p.add_argument("--T", type=int, default=None, help="tokens per sequence (default 512)")
    p.add_argument("--prompt", type=int, default=None, help="masked prompt tokens (default 32)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dry = args.dry_run
    for k, full, small in (("model", "llama-3.2-1b", "dry"), ("B", 8, 2), ("T", 512, 24), ("prompt", 32, 4),
                           ("steps", 20, 3), ("warmup", 3, 1)):
        if getattr(args, k) is None:
            setattr(args, k, small if dry else full)
    return args


def worker_args(args) -> list:
    """The command-line options of one worker of this configuration (without ``--variant``)."""
    out = ["--model", args.model, "--B", str(args.B), "--T", str(args.T), "--prompt", str(args.prompt),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return out + (["--dry-run"] if args.dry_run else [])


def summary(ours: dict, hf: dict) -> dict:
    """Ratios of the two variants (ours / hf)."""
    out = {"tokens_per_s_ratio": ours["tokens_per_s"] / hf["tokens_per_s"]}
    if ours.get("peak_bytes") and hf.get("peak_bytes"):
        out["peak_memory_ratio"] = ours["peak_bytes"] / hf["peak_bytes"]
    if ours.get("loss_step1") is not None and hf.get("loss_step1") is not None:
        out["loss_step1_rel_diff"] = abs(ours["loss_step1"] - hf["loss_step1"]) / max(abs(hf["loss_step1"]), 1e-12)
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        return emit(worker(args))
    rows = {}
    for v in ("hf", "ours"):
        rows[v] = run_worker("bench.gpu_unlearn", ["--variant", v, *worker_args(args)], exact_rss=False)
        print(f"{v:5s} {rows[v]['median_step_s'] * 1e3:9.1f} ms/step {rows[v]['tokens_per_s']:10.0f} tok/s "
              f"peak {(rows[v]['peak_bytes'] or 0) / 2**30:7.2f} GiB", flush=True)
    payload = {**result_header("gpu-unlearn", "bench.gpu_unlearn", argv), "results": rows,
               "summary": summary(rows["ours"], rows["hf"])}
    print(json.dumps(payload["summary"]))
    out = args.out or (None if not args.dry_run else __import__("tempfile").mkdtemp(prefix="gpu-unlearn-"))
    print(f"wrote {write_result('gpu-unlearn', payload, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
