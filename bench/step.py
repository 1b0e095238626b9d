"""One full unlearning step (forward, backward, clip, AdamW): this trainer vs an HF-Trainer step with a naive
full-logits SimNPO loss, on the same tiny Llama and the same forget + retain batch.

    python -m bench.step                        # V=32000, d=256, 2 layers, 8 forget + 8 retain x 256 tokens
    python -m bench.step --repeats 3 --out /tmp/x

* ``ours``: :func:`simnpo_fast.train.train_step` -- FSDP2 (world size 1, gloo on CPU), forget and retain
  in one backbone pass, fused SimNPO + retain NLL computed inside the LM head's forward, no logits.
* ``hf``: ``transformers.Trainer.training_step`` + ``optimizer.step`` with the loss most users write:
  ``model(forget).logits`` -> ``log_softmax`` -> gather -> SimNPO, plus ``model(**retain).loss``
  (HF's own cross-entropy on full logits), i.e. the open-unlearning SimNPO recipe.

Every variant runs in a fresh subprocess. After two warm-up steps (optimizer state allocated), the RSS
high-water mark is reset; ``peak_extra_mib`` is the high-water mark of the timed steps minus the RSS before
them (activations, logits, gradients: what one step adds on top of weights + optimizer state). ``tokens/s``
counts the non-padding tokens of the forget and retain batches per step (median step time).
"""
from __future__ import annotations

import argparse
import os
import sys

from bench.harness import PeakRSS, alternate, emit, median_time, result_header, write_result


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.V, hidden_size=args.d, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=2048,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _batch(args, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    B, T = args.B, args.T
    ids = torch.randint(3, args.V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.clone()
    labels[:, : args.prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ours(args):
    import torch

    from simnpo_fast.batch import ForgetRetainBatch
    from simnpo_fast.criterion import UnlearningCriterion
    from simnpo_fast.distributed import apply_fsdp, init_distributed, mixed_precision_policy
    from simnpo_fast.model import UnlearnModel
    from simnpo_fast.train import StepContext, train_step
    from transformers import LlamaForCausalLM

    info = init_distributed("cpu")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(_config(args))
    model = UnlearnModel(hf)
    apply_fsdp(model, mp_policy=mixed_precision_policy(info.device, "no"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    crit = UnlearningCriterion("simnpo", beta=2.5, gamma=0.0, forget_weight=1.0, retain_weight=1.0)
    ctx = StepContext(model=model, criterion=crit, optimizer=opt, device=info.device, max_grad_norm=1.0)
    f, r = _batch(args, 1), _batch(args, 2)
    batch = ForgetRetainBatch(*(torch.cat([f[k], r[k]]) for k in ("input_ids", "attention_mask", "labels")),
                              n_forget=args.B, index=torch.arange(args.B))
    n_tok = int(batch.attention_mask.sum())
    return lambda: train_step(ctx, [batch]), n_tok


def _hf(args, tmp):
    import torch
    from transformers import LlamaForCausalLM, TrainingArguments

    from bench.methods import naive_simnpo_trainer

    NaiveSimNPOTrainer = naive_simnpo_trainer(beta=2.5, gamma=0.0)

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(args))
    targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.B, learning_rate=1e-5,
                              max_grad_norm=1.0, report_to=[], use_cpu=True, save_strategy="no",
                              remove_unused_columns=False, disable_tqdm=True)
    tr = NaiveSimNPOTrainer(model=model, args=targs)
    tr.create_optimizer_and_scheduler(num_training_steps=100)
    tr.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we drive training_step directly
    inputs = {"forget": _batch(args, 1), "retain": _batch(args, 2)}
    n_tok = int(inputs["forget"]["attention_mask"].sum() + inputs["retain"]["attention_mask"].sum())

    def step():
        loss = tr.training_step(model, inputs)
        tr.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return loss

    return step, n_tok


def worker(args) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    if args.variant == "ours":
        step, n_tok = _ours(args)
    else:
        step, n_tok = _hf(args, tempfile.mkdtemp())
    step()
    step()  # optimizer state allocated, thread pools warm
    with PeakRSS() as mem:
        t, ts = median_time(step, args.repeats, warmup=0)
    return {"variant": args.variant, "median_s": t, "times_s": ts, "tokens_per_step": n_tok,
            "tokens_per_s": n_tok / t, "peak_extra_mib": mem.extra_mib, "rss_before_mib": mem.base_kib / 1024,
            "hwm_reset": mem.hwm_reset}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="ours", choices=["ours", "hf"])
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--B", type=int, default=8, help="forget sequences per step (and as many retain)")
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens masked out of the labels")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2,
                   help="fresh worker pairs, alternating hf/ours; the best (min) median step time is kept, which "
                        "filters out machine contention")
    p.add_argument("--chunk-rows", type=int, default=0, help="SIMNPO_FAST_CHUNK_ROWS for ours (0: backend default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        return emit(worker(args))
    common = [f"--{k}={getattr(args, k)}" for k in ("V", "d", "ffn", "layers", "heads", "B", "T", "prompt",
                                                    "repeats", "threads")]
    if args.chunk_rows:
        os.environ["SIMNPO_FAST_CHUNK_ROWS"] = str(args.chunk_rows)  # inherited by the workers
    runs = alternate("bench.step", ("hf", "ours"), lambda v: ["--variant", v, *common], args.rounds, exact_rss=True,
                     on_result=lambda v, r: print(f"{v:5s} {r['median_s']*1e3:9.1f} ms/step  {r['tokens_per_s']:9.0f} "
                                                  f"tok/s  peak +{r['peak_extra_mib']:8.1f} MiB", flush=True))
    rows = {v: best_of(rs) for v, rs in runs.items()}
    speed = rows["ours"]["tokens_per_s"] / rows["hf"]["tokens_per_s"]
    mem = rows["ours"]["peak_extra_mib"] / rows["hf"]["peak_extra_mib"]
    summary = {"tokens_per_s_ratio": speed, "peak_memory_ratio": mem,
               "targets": {"tokens_per_s_ratio": ">= 1.3", "peak_memory_ratio": "<= 0.5"},
               "meets_targets": bool(speed >= 1.3 and mem <= 0.5)}
    print(f"\nours / hf: {speed:.2f}x tokens/s, {mem*100:.1f}% peak step memory")
    payload = {**result_header("step", "bench.step", argv), "config": vars(args), "results": rows, "summary": summary}
    print(f"wrote {write_result('step', payload, args.out)}")
    return 0


def best_of(rs: list[dict]) -> dict:
    """The round with the fastest median step (contention only slows a step down), the worst peak memory."""
    best = dict(min(rs, key=lambda r: r["median_s"]))
    best["peak_extra_mib"] = max(r["peak_extra_mib"] for r in rs)
    best["all_median_s"] = [r["median_s"] for r in rs]
    return best

if __name__ == "__main__":
    sys.exit(main())
