"""Per-rank memory of the sharded training state against the world size: measured on 1, 2 and 4 gloo ranks
(FSDP2 through the trainer's own ``apply_fsdp`` and step), against 1/world_size of the unsharded state and
against the planner (``simnpo_fast.plan``, ``device="cpu"``, ``gpus`` = ranks).

    python -m bench.memory_scaling                 # ~106 M-parameter Llama, ranks 1 2 4, JSON to bench/results
    python -m bench.memory_scaling --ranks 1 2 --model '{"vocab_size": 1000, ...}' --out /tmp/x

Each world size runs under ``torchrun --nproc_per_node W`` with glibc's mmap threshold fixed (freed large blocks
leave the RSS, so the RSS is live memory). Every rank first builds, shards and trains one step of a tiny twin of
the model (imports, thread pools, gloo buffers: one-time costs), then measures its RSS (``base``), builds the
model (seed 0, fp32), shards it, runs one optimizer step of SimNPO + retain NLL on a 2 x 32-token batch with
the gradients kept, and measures again. ``state`` = that RSS minus ``base``: the rank's parameters, gradients
and AdamW moments, plus whatever else stayed allocated. ``tensors`` counts the local shards' bytes
(parameters, gradients, optimizer state tensors) exactly. Targets: ``state(W)`` within 5% of ``state(1) / W``,
and the planner's ``parameters + gradients + optimizer_states`` within 10% of every measured ``state``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

from bench.harness import ROOT, result_header, rss_kib, write_result
from bench.harness.measure import EXACT_RSS_ENV

#: ~106 M parameters, untied: embeddings + head 49 M, 8 layers 57 M (16 bytes each: 1.7 GB of state unsharded)
MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=12, tie_word_embeddings=False)
TWIN = dict(MODEL, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4)


def _step(shape: dict):
    """Build ``shape`` (seed 0), shard it, take one optimizer step with the gradients kept; returns its
    :class:`~simnpo_fast.train.StepContext`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_unlearn import batches
    from simnpo_fast.batch import ForgetRetainBatch
    from simnpo_fast.criterion import UnlearningCriterion
    from simnpo_fast.distributed import apply_fsdp, init_distributed, mixed_precision_policy
    from simnpo_fast.model import UnlearnModel
    from simnpo_fast.train import StepContext
    from simnpo_fast.train.step import clip_and_check, forward_backward, step_counts

    info = init_distributed("cpu")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2))
    model = apply_fsdp(UnlearnModel(hf), mp_policy=mixed_precision_policy(info.device, "no"))
    del hf
    gc.collect()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    crit = UnlearningCriterion("simnpo", beta=2.5, gamma=0.0, forget_weight=1.0, retain_weight=1.0)
    ctx = StepContext(model=model, criterion=crit, optimizer=opt, device=info.device, max_grad_norm=1.0)
    a = argparse.Namespace(model=json.dumps(shape), B=1, T=32, prompt=4)
    f, r = batches(a)
    batch = ForgetRetainBatch(*(torch.cat([f[k], r[k]]) for k in ("input_ids", "attention_mask", "labels")),
                              n_forget=1, index=torch.arange(1))
    stats = forward_backward(ctx, [batch], step_counts(ctx, [batch]))
    clip_and_check(ctx, stats.loss)
    opt.step()  # the moments now exist; the gradients are kept (no zero_grad)
    return ctx


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def tensor_bytes(ctx) -> dict:
    """Bytes of this rank's parameter shards, gradient shards and optimizer state tensors."""
    import torch

    params = [p for p in ctx.model.parameters()]
    states = [v for s in ctx.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"parameters": sum(_local_bytes(p) for p in params),
            "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer_states": sum(_local_bytes(v) for v in states)}


def worker(args) -> None:
    import torch

    from simnpo_fast.distributed import barrier, gather_objects, rank, world_size

    torch.set_num_threads(1)
    twin = _step(TWIN)  # one-time costs outside the measurement
    del twin
    gc.collect()
    barrier()
    base = rss_kib()
    ctx = _step(json.loads(args.model))
    gc.collect()
    barrier()
    me = {"rank": rank(), "base_mib": base / 1024, "state_mib": (rss_kib() - base) / 1024,
          "hwm_mib": rss_kib("VmHWM") / 1024, "tensors_mib": {k: v / 2**20 for k, v in tensor_bytes(ctx).items()}}
    everyone = gather_objects(me)
    if rank() == 0:
        with open(args.out_file, "w") as f:
            json.dump({"world_size": world_size(), "ranks": everyone}, f)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(ranks: int, model: dict, timeout: int = 1200) -> dict:
    """One world size under torchrun (exact-RSS allocator); the ranks' measures."""
    out = os.path.join(tempfile.mkdtemp(prefix="memscale-"), "out.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "bench.memory_scaling", "--worker",
           "--model", json.dumps(model), "--out-file", out]
    env = dict(os.environ, **EXACT_RSS_ENV, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed:\n{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def summarise(rows: dict, model: dict) -> dict:
    """Per world size: mean / max measured state, 1/W of the one-rank state, the planner; errors and targets."""
    from simnpo_fast.plan import ModelShape, PlanConfig, plan, sharded_state_bytes

    shape = ModelShape(**model)
    one = max(r["state_mib"] for r in rows["1"]["ranks"]) if "1" in rows else None
    out = {}
    for w, res in rows.items():
        states = [r["state_mib"] for r in res["ranks"]]
        planned = sharded_state_bytes(plan(shape, PlanConfig(device="cpu", gpus=int(w), seq=32, batch=2))) / 2**20
        worst = max(states, key=lambda s: abs(s - planned))
        e = {"state_mib": states, "planner_mib": planned, "planner_rel_err": abs(worst - planned) / worst,
             "tensors_mib": [sum(r["tensors_mib"].values()) for r in res["ranks"]]}
        if one:
            ideal = one / int(w)
            e["ideal_mib"] = ideal
            e["vs_ideal_rel_err"] = max(abs(s - ideal) / ideal for s in states)
        out[w] = e
    ok_ideal = all(e.get("vs_ideal_rel_err", 0) <= 0.05 for e in out.values())
    ok_plan = all(e["planner_rel_err"] <= 0.10 for e in out.values())
    return {"per_world_size": out, "targets": {"vs_ideal_rel_err": "<= 0.05", "planner_rel_err": "<= 0.10"},
            "meets_targets": bool(ok_ideal and ok_plan), "params": shape.params()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--model", default=json.dumps(MODEL), help="LlamaConfig fields as JSON")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    model = json.loads(args.model)
    load_before = os.getloadavg()
    rows = {}
    for w in args.ranks:
        rows[str(w)] = measure(w, model)
        st = [f"{r['state_mib']:.1f}" for r in rows[str(w)]["ranks"]]
        print(f"{w} rank(s): state per rank {', '.join(st)} MiB", flush=True)
    summary = summarise(rows, model)
    for w, e in summary["per_world_size"].items():
        print(f"W={w}: planner {e['planner_mib']:.1f} MiB (err {e['planner_rel_err']:.1%})"
              + (f", 1/W of one rank {e['ideal_mib']:.1f} MiB (err {e['vs_ideal_rel_err']:.1%})" if "ideal_mib" in e
                 else ""))
    payload = {**result_header("memory_scaling", "bench.memory_scaling", argv), "model": model, "rows": rows,
               "summary": summary, "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    print(f"meets targets: {summary['meets_targets']}")
    print(f"wrote {write_result('memory_scaling', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
