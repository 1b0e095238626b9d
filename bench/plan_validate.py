"""Planner vs reality: the peak memory of one real unlearning step of small Llama models on CPU.

    python -m bench.plan_validate            # 3 configs x (fused, naive logits), JSON to bench/results
    python -m bench.plan_validate --quick    # the same run (the configs are small); the suite passes it

Each (config, logits) runs in a fresh subprocess (``harness.run_worker``: fixed glibc mmap threshold, so
freed blocks go back to the OS and the RSS high-water mark tracks live tensors). The worker imports everything
and runs a throw-away micro step (library start-up), records the RSS, builds the HF LlamaForCausalLM (fp32, SDPA,
no checkpointing), runs one warm-up step (forward of the backbone, SimNPO loss on the final hidden states and the
LM-head weight -- ``backend="chunked"`` (fused) or, as unlearning frameworks do (naive), full ``[B, T-1, V]``
logits of every position, fp32 ``F.cross_entropy(reduction="none")`` and SimNPO on top -- backward,
AdamW step, zero_grad), resets the high-water mark and runs a second, steady-state step. Measured peak = VmHWM of
that step minus the RSS before the model existed: parameters, AdamW states, gradients, activations, logits.
Predicted = ``simnpo_fast.plan.plan(..., device="cpu", checkpointing=False)``.
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.harness import PeakRSS, emit, result_header, rss_kib, run_worker, simnpo, write_result
from bench.methods import simnpo_from_logp_sum

CONFIGS = {
    # name: (model config, seq, batch)
    "llama-h256-L4-V32k": (dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4), 256, 4),
    "llama-h512-L2-V32k": (dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=4), 256, 2),
    "llama-h384-L6-V16k": (dict(vocab_size=16000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                num_attention_heads=6, num_key_value_heads=2), 512, 2),
}


def _model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(**cfg, tie_word_embeddings=False, max_position_embeddings=4096)
    conf._attn_implementation = "sdpa"
    return LlamaForCausalLM(conf).float()


def _step(model, opt, ids, labels, loss_kind):
    import torch

    hidden = model.model(input_ids=ids).last_hidden_state
    if loss_kind == "fused":
        loss = simnpo("chunked")(hidden, model.lm_head.weight, labels)
    else:  # what unlearning frameworks run: full logits of every position, per-token cross-entropy, SimNPO on top
        logits = model.lm_head(hidden)[:, :-1].float()
        tgt = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                               reduction="none").view(tgt.shape)
        del logits
        loss = simnpo_from_logp_sum(-ce.sum(1), (tgt != -100).sum(1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del hidden
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss)


def worker(args) -> dict:
    import torch

    cfg, seq, batch = CONFIGS[args.config]
    g = torch.Generator().manual_seed(0)

    def batch_for(V, T, B):
        ids = torch.randint(0, V, (B, T), generator=g)
        lab = ids.clone()
        lab[:, : T // 4] = -100
        return ids, lab

    # library start-up off the books
    tiny = _model(dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2))
    o = torch.optim.AdamW(tiny.parameters(), lr=1e-5)
    _step(tiny, o, *batch_for(256, 16, 2), args.loss)
    del tiny, o
    base = rss_kib("VmRSS")
    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids, lab = batch_for(cfg["vocab_size"], seq, batch)
    _step(model, opt, ids, lab, args.loss)
    with PeakRSS() as mem:  # the steady-state step
        t0 = time.perf_counter()
        _step(model, opt, ids, lab, args.loss)
        dt = time.perf_counter() - t0
    return {"config": args.config, "loss": args.loss, "seq": seq, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()),
            "measured_mib": (mem.peak_kib - base) / 1024, "steady_rss_mib": (mem.base_kib - base) / 1024,
            "hwm_reset": mem.hwm_reset, "step_s": dt}


def predict(name: str, loss: str) -> dict:
    from simnpo_fast.plan import ModelShape, PlanConfig, plan

    cfg, seq, batch = CONFIGS[name]
    shape = ModelShape(name=name, **cfg)
    return plan(shape, PlanConfig(device="cpu", gpus=1, seq=seq, batch=batch, logits=loss, checkpointing=False))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=next(iter(CONFIGS)))
    p.add_argument("--loss", default="fused", choices=["fused", "naive"])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--quick", action="store_true", help="accepted for symmetry with the suite (configs are small)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        return emit(worker(args))
    rows = []
    print(f"{'model':<22}{'params':>9}{'logits':>8}{'predicted':>12}{'measured':>12}{'error':>8}")
    for name in args.configs.split(","):
        for loss in ("fused", "naive"):
            m = run_worker("bench.plan_validate", ["--config", name, "--loss", loss])
            pr = predict(name, loss)
            pred = pr["peak_bytes"] / 2**20
            row = {"name": name, **m, "predicted_mib": pred, "error": pred / m["measured_mib"] - 1,
                   "predicted_terms_mib": {k: v / 2**20 for k, v in pr["terms_bytes"].items()},
                   "predicted_phase": pr["peak_phase"]}
            rows.append(row)
            print(f"{name:<22}{m['params'] / 1e6:>8.1f}M{loss:>8}{pred:>10.0f}Mi{m['measured_mib']:>10.0f}Mi"
                  f"{row['error'] * 100:>+7.1f}%", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst * 100:.1f}% (target <= 15%)")
    payload = {**result_header("plan_validate", "bench.plan_validate", argv), "rows": rows,
               "worst_abs_error": worst, "within_15pct": worst <= 0.15}
    print(f"wrote {write_result('plan_validate', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
