"""Step time over the epochs of a SimNPO unlearning run on the trained model, row filtering on vs off.

    python -m bench.unlearn_filter                  # ~3 min on 2 cores (fine-tuning included; then cached)
    python -m bench.unlearn_filter --epochs 6 --retain-weight 0 --out /tmp/x

The model of ``bench.trained_model`` is first fine-tuned on the forget and retain question-answer pairs until it
knows them (the "target" model of TOFU, cached next to it); then two unlearning runs start from it with the same
seed and batches: SimNPO (beta 2.5, gamma 0) on the forget pairs, plus ``--retain-weight`` x retain NLL, AdamW,
``--epochs`` epochs, the fused losses of ``simnpo_fast`` (chunked backend, fp32) with ``grad_filter=None`` and
with the row filter (``GradFilter(rows=--rows)``: a forget sequence whose SimNPO weight has fallen below
``rows`` x its full weight skips its backward through the LM head). Per step: the wall time of forward, backward
and the AdamW step; the share of forget sequences kept; the forget and retain mean answer log-likelihood per
token. The two runs alternate step by step (off, on, off, on, ...: the drift of a shared machine hits both), each
with its own model and optimizer, after one untimed warm-up step of each on a throwaway copy (else the first
epoch's steps carry the process's start-up and "last epoch / first epoch" measures that). At the end both are
evaluated on every forget and retain pair.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

from bench import trained_model as tm
from bench.harness import result_header, write_result

BETA, GAMMA = 2.5, 0.0
#: the timed pieces of a step, in order (seconds each, in every step's log): the heads' entries include the
#: gradients the fused losses compute in their forward; ``backward`` is the body's backward and the gradients'
#: accumulation, ``optimizer`` AdamW (foreach, as the trainer's)
PIECES = ("forget_body_fwd", "forget_head", "retain_body_fwd", "retain_head", "backward", "optimizer")


def qa_batches(tok, pairs, batch: int):
    """``[(ids [B, T], labels [B, T])]``: question tokens masked (-100), answer + EOS the targets, right-padded."""
    import torch

    out = []
    for b0 in range(0, len(pairs), batch):
        rows = []
        for q, a in pairs[b0 : b0 + batch]:
            qi = tok(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
            ai = tok(f" {a}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((qi + ai, len(qi)))
        T = max(len(r) for r, _ in rows)
        ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.int64)
        labels = torch.full((len(rows), T), -100, dtype=torch.int64)
        for i, (r, nq) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, nq : len(r)] = torch.tensor(r[nq:])
        out.append((ids, labels))
    return out


def mean_loglik(model, batches) -> float:
    """Mean answer log-likelihood per token (fused, no logits)."""
    import torch

    import simnpo_fast as sf

    tot = n = 0.0
    with torch.no_grad():
        for ids, labels in batches:
            h = model.model(input_ids=ids).last_hidden_state  # right padding: causal attention never sees it
            lp, cnt = sf.sequence_logprob(h, model.lm_head.weight, labels)
            tot, n = tot + float(lp.sum()), n + float(cnt.sum())
    return tot / max(n, 1.0)


def finetune(model, batches, epochs: int, lr: float) -> None:
    import torch

    import simnpo_fast as sf

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        for ids, labels in batches:
            h = model.model(input_ids=ids).last_hidden_state
            loss = sf.nll_loss(h, model.lm_head.weight, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def target_model(args):
    """``(model, forget batches, retain batches, info)``: the trained model fine-tuned on the pairs (cached)."""
    import torch

    folder = tm.build(tm.parse([]), log=lambda m: print(m, file=sys.stderr))
    model, tok, _, meta = tm.load(folder)
    pairs, _, _ = tm.corpus_pairs(tm.parse([]).tofu, tm.CACHE)
    forget, retain = pairs[-args.n_forget:], pairs[: args.n_retain]  # TOFU: forget10's authors come last
    fb, rb = qa_batches(tok, forget, args.batch), qa_batches(tok, retain, args.batch)
    path = folder / f"target-{args.n_forget}-{args.n_retain}-{args.ft_epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        torch.manual_seed(0)
        finetune(model.train(), [b for pair in zip(fb, rb) for b in pair], args.ft_epochs, 1e-3)
        torch.save(model.state_dict(), path)
    return model.train(), fb, rb, {"forget_loglik": mean_loglik(model, fb), "retain_loglik": mean_loglik(model, rb)}


class Run:
    """One unlearning run: its own model copy, AdamW and backend (for the filter's statistics)."""

    def __init__(self, model, flt, lr):
        import torch

        from simnpo_fast.backends import ChunkedBackend

        self.model, self.flt, self.be = copy.deepcopy(model), flt, ChunkedBackend()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0, foreach=True)
        self.log = []

    def step(self, fbatch, rbatch, retain_weight: float) -> None:
        import simnpo_fast as sf
        from simnpo_fast.objectives import SimNPO

        m = self.model
        (fi, fl), (ri, rl) = fbatch, rbatch
        t = [time.perf_counter()]
        hf = m.model(input_ids=fi).last_hidden_state
        t.append(time.perf_counter())
        loss, logp, n = sf.fused_sequence_loss(hf, m.lm_head.weight, fl, SimNPO(BETA, GAMMA), backend=self.be,
                                               grad_filter=self.flt, return_logp=True)
        kept = self.be.last_filter_stats.get("rows_kept", 1.0)
        t.append(time.perf_counter())
        if retain_weight > 0:
            hr = m.model(input_ids=ri).last_hidden_state
            t.append(time.perf_counter())
            loss = loss + retain_weight * sf.nll_loss(hr, m.lm_head.weight, rl, backend=self.be, grad_filter=None)
        else:
            t.append(t[-1])
        t.append(time.perf_counter())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        self.opt.step()
        t.append(time.perf_counter())
        self.log.append({"s": t[-1] - t[0], "forget_kept": kept, **{k: b - a for k, a, b in zip(PIECES, t, t[1:])},
                         "forget_loglik": float(logp.sum() / n.sum()), "loss": float(loss.detach())})


def unlearn(args, model, fb, rb) -> dict:
    """The two runs, alternating step by step over ``args.epochs`` epochs of the forget batches."""
    from simnpo_fast.backends.filter import GradFilter

    runs = {"off": Run(model, None, args.lr), "on": Run(model, GradFilter(rows=args.rows), args.lr)}
    for run in runs.values():  # warm-up (thread pools, allocator, GEMM buffers) on throwaway copies: epoch 0 is
        Run(model, run.flt, args.lr).step(fb[0], rb[0], args.retain_weight)  # timed like the others
    for epoch in range(args.epochs):
        for i, fbatch in enumerate(fb):
            for run in runs.values():
                run.step(fbatch, rb[i % len(rb)], args.retain_weight)
        per = {k: r.log[-len(fb):] for k, r in runs.items()}
        print(f"epoch {epoch}: " + "  ".join(
            f"{k}: {statistics.median(e['s'] for e in v) * 1e3:7.0f} ms/step, kept "
            f"{statistics.mean(e['forget_kept'] for e in v):.2f}, forget lp/token "
            f"{statistics.mean(e['forget_loglik'] for e in v):7.3f}" for k, v in per.items()), flush=True)
    out = {}
    for k, r in runs.items():
        n = len(fb)
        epochs = [r.log[e * n : (e + 1) * n] for e in range(args.epochs)]
        out[k] = {"steps": r.log,
                  "epoch_median_step_s": [statistics.median(s["s"] for s in ep) for ep in epochs],
                  "epoch_median_pieces_s": {k: [statistics.median(s[k] for s in ep) for ep in epochs] for k in PIECES},
                  "epoch_forget_kept": [statistics.mean(s["forget_kept"] for s in ep) for ep in epochs],
                  "final_forget_loglik": mean_loglik(r.model, fb), "final_retain_loglik": mean_loglik(r.model, rb)}
        e = out[k]["epoch_median_step_s"]
        out[k]["last_over_first"] = e[-1] / e[0]
    out["on_over_off_per_epoch"] = [a / b for a, b in zip(out["on"]["epoch_median_step_s"],
                                                         out["off"]["epoch_median_step_s"])]
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-forget", type=int, default=64)
    p.add_argument("--n-retain", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ft-epochs", type=int, default=6, help="fine-tuning epochs of the target model")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rows", type=float, default=1e-3)
    p.add_argument("--retain-weight", type=float, default=1.0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    args = parse(argv)
    t0 = time.time()
    torch.manual_seed(0)
    model, fb, rb, before = target_model(args)
    print(f"target model: forget lp/token {before['forget_loglik']:.3f}, retain {before['retain_loglik']:.3f}")
    runs = unlearn(args, model, fb, rb)
    for k in ("off", "on"):
        r = runs[k]
        print(f"{k}: last epoch / first epoch step time {r['last_over_first']:.2f}; final forget lp/token "
              f"{r['final_forget_loglik']:.3f}, retain {r['final_retain_loglik']:.3f}")
    folder = tm.build(tm.parse([]), log=print)
    payload = {**result_header("unlearn_filter", "bench.unlearn_filter", argv), "config": vars(args),
               "model": {k: tm.load(folder)[3][k] for k in ("corpus", "vocab_size", "heldout_loss", "model")},
               "target": before, "runs": runs, "wall_s": time.time() - t0}
    print(f"wrote {write_result('unlearn_filter', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
