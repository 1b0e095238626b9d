"""The result of ``make gpu-check`` (``bench/gpu_check.py``): the JSON, its Markdown summary, the rule that picks
the CUDA default backend from the measured numbers, and the per-GPU rates the planner's table reads.

The rule (:func:`backend_rule`; :data:`RULE` is the sentence written into both files): among ``triton`` and
``triton-gemm``, the candidates are those that passed ``bench.gpu``'s bf16 correctness check against the fp64
oracle, were timed without error at every measured vocabulary, and used at most a quarter of the naive path's
extra memory at each. The default is the candidate with the smaller geometric mean of its fwd+bwd times over the
vocabularies; within 3% of each other ``triton`` wins (it holds no logits tile in memory). With no candidate the
default is ``chunked`` if it passed, else none (the current default stays and the JSON says why).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Optional

RULE = ("CUDA default backend = the faster (geometric mean of fwd+bwd time over the measured vocabularies) of "
        "triton and triton-gemm among those that passed the bf16 check against the fp64 oracle, ran at every "
        "vocabulary and used <= 1/4 of the naive path's extra memory; within 3% triton wins (no logits tile); "
        "none qualifies: chunked if it passed, else keep the current default.")
CURRENT_DEFAULT = "triton"  # simnpo_fast.backends: CUDA tensors use Triton unless told otherwise
TIE = 0.03


def output_path(out_dir: Optional[Path]) -> Path:
    """``<out_dir or bench/results>/gpu-<gpu>-<date>.json``, never an existing file (``-2``, ``-3``, ...)."""
    from bench.harness import RESULTS, fresh_path, machine_tag

    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return fresh_path(out, f"gpu-{machine_tag()}-{_dt.date.today().isoformat()}")


def start_payload(argv, args, notes: dict, path: Path) -> dict:
    from bench.harness import result_header

    head = result_header("gpu-check", "bench.gpu_check", argv)
    head["command"] = "make gpu-check" + (" DRY_RUN=1" if args.dry_run else "") + f"  ({head['command']})"
    return {**head, "path": str(path), "dry_run": args.dry_run, "budget_s": args.budget, "notes": notes,
            "rule": RULE, "stages": {}}


def _bench_results(payload: dict) -> list:
    return [s["result"] for s in payload["stages"].values() if s.get("kind") == "bench" and s.get("result")]


def backend_rule(payload: dict) -> dict:
    """``{"backend", "why", "scores_ms"}`` by :data:`RULE` from the bench stages of a gpu-check payload."""
    benches = _bench_results(payload)
    if not benches:
        return {"backend": None, "why": "no bench stage finished", "current_default": CURRENT_DEFAULT}
    checks = {}
    for b in benches:
        checks.update((b.get("correctness") or {}).get("results", {}))
    timings = {V: e for b in benches for V, e in b["timing"].items()}
    scores, why = {}, {}
    for name in ("triton", "triton-gemm", "chunked"):
        ok = checks.get(f"{name}/bfloat16", {}).get("ok")
        rows = [e["methods"].get(name, {}) for e in timings.values()]
        if not ok:
            why[name] = "did not pass the bf16 check" if ok is False else "no bf16 check result"
        elif any("ms" not in r for r in rows):
            why[name] = "not timed at every vocabulary"
        elif name != "chunked" and any((r.get("extra_vs_naive") or 0) > 0.25 for r in rows):
            why[name] = "more than 1/4 of the naive path's extra memory"
        else:
            scores[name] = math.exp(sum(math.log(r["ms"]) for r in rows) / len(rows))
    fused = {k: v for k, v in scores.items() if k != "chunked"}
    if fused:
        best = min(fused, key=fused.get)
        if "triton" in fused and fused["triton"] <= fused[best] * (1 + TIE):
            best = "triton"
        reason = f"geometric-mean fwd+bwd ms {', '.join(f'{k} {v:.3f}' for k, v in fused.items())}"
    elif "chunked" in scores:
        best, reason = "chunked", "neither Triton design qualified"
    else:
        best, reason = None, "no backend qualified: keep the current default"
    return {"backend": best, "why": reason, "excluded": why, "scores_ms": scores, "current_default": CURRENT_DEFAULT,
            "change_default": best is not None and best != CURRENT_DEFAULT, "vocabularies": sorted(timings, key=int)}


def unlearn_summary(payload: dict) -> Optional[dict]:
    from bench.gpu_unlearn import summary

    runs = {v: payload["stages"].get(f"unlearn-{v}", {}).get("result") for v in ("ours", "hf")}
    out = {k: v for k, v in runs.items() if v}
    if len(out) == 2:
        out["summary"] = summary(out["ours"], out["hf"])
    return out or None


def finish(payload: dict, path: Path) -> None:
    """Derived numbers (unlearn summary, backend rule, planner rates) and both files, rewritten in place."""
    from simnpo_fast.plan_table import rates_from_gpu_check

    payload["unlearn"] = unlearn_summary(payload)
    payload["backend_rule"] = backend_rule(payload)
    payload["rates"] = rates_from_gpu_check(payload)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(payload) + "\n")


def _fmt(v, spec=".3f", none="-"):
    return format(v, spec) if isinstance(v, (int, float)) else none


def _bench_md(payload: dict) -> list:
    out = []
    for b in _bench_results(payload):
        c = b["config"]
        for V, e in b["timing"].items():
            out += ["", f"**LM-head SimNPO fwd+bwd**, N={c['N']} d={c['d']} V={V} {c['dtype']}: GEMM "
                    f"{_fmt(e['gemm_tflops'], '.1f')} TFLOP/s, 6NdV floor {_fmt(e['floor_6NdV_ms'])} ms", "",
                    "| method | ms | x floor | peak above inputs MiB | extra vs naive |", "|---|---|---|---|---|"]
            for name, r in e["methods"].items():
                if "error" in r:
                    out.append(f"| {name} | error: {r['error'][:80]} | | | |")
                else:
                    out.append(f"| {name} | {_fmt(r.get('ms'))} | {_fmt(r.get('x_floor'), '.2f')} | "
                               f"{_fmt(r.get('peak_above_inputs_MiB'), '.0f')} | {_fmt(r.get('extra_vs_naive'))} |")
        for k, v in b.get("notes", {}).items():
            out.append(f"- note {k}: {v}")
    return out


def _unlearn_md(payload: dict) -> list:
    u = payload.get("unlearn") or {}
    if not u:
        return []
    out = ["", "**1-GPU unlearning run** (bench.gpu_unlearn: bf16 mixed precision, activation checkpointing)", "",
           "| variant | params | tokens/step | median step s | tokens/s | peak GiB | loss step 1 |",
           "|---|---|---|---|---|---|---|"]
    for v in ("hf", "ours"):
        r = u.get(v)
        if r:
            peak = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else None
            out.append(f"| {v} | {r['params'] / 1e6:,.1f} M | {r['tokens_per_step']} | {_fmt(r['median_step_s'])} | "
                       f"{r['tokens_per_s']:,.0f} | {_fmt(peak, '.2f')} | {_fmt(r.get('loss_step1'), '.4f')} |")
    s = u.get("summary")
    if s:
        out += ["", f"ours / hf: {s['tokens_per_s_ratio']:.2f}x tokens/s"
                + (f", {s['peak_memory_ratio']:.2f}x peak memory" if "peak_memory_ratio" in s else "")
                + (f", step-1 loss differs by {s['loss_step1_rel_diff']:.1e} (relative)"
                   if "loss_step1_rel_diff" in s else "")]
    return out


def markdown(payload: dict) -> str:
    m = payload["machine"]
    out = [f"# make gpu-check{' (DRY RUN: CPU code check, not a result)' if payload['dry_run'] else ''}", "",
           f"{m.get('gpu') or m.get('cpu')}, torch {m.get('torch')}, triton {m.get('triton')}, "
           f"transformers {m['versions'].get('transformers')}, commit {m.get('git')}, {m.get('date')}", "",
           "| stage | status | seconds | budget s | |", "|---|---|---|---|---|"]
    for name, s in payload["stages"].items():
        extra = ""
        r = s.get("result") or {}
        if s.get("kind") == "tests" and r:
            extra = f"{r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"
        out.append(f"| {name} | {s['status']} | {s.get('seconds', '-')} | {s.get('budget_s', '-')} | {extra} |")
    out += _bench_md(payload) + _unlearn_md(payload)
    rule = payload.get("backend_rule") or {}
    out += ["", f"**CUDA default backend**: {rule.get('backend')} ({rule.get('why')}; current default "
            f"{rule.get('current_default')}{', change it' if rule.get('change_default') else ''})", "",
            f"Rule: {payload['rule']}"]
    for k, v in (rule.get("excluded") or {}).items():
        out.append(f"- {k}: {v}")
    if payload.get("rates"):
        out += ["", f"Planner rates (`simnpo-fast plan --table --rates {payload['path']}`): body "
                f"{payload['rates']['body_flops_per_s'] / 1e12:.0f} TFLOP/s"]
    return "\n".join(out)
