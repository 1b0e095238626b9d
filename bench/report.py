"""The report of a suite result: PNG plots and bench/results/README_section.md (``python -m bench.suite --report``).

One PNG per sweep axis and dtype: left panel median fwd+bwd time, right panel peak memory above the inputs,
one line per method, log-log axes; the 6NdV GEMM floor is drawn as a dashed black line on the time panel.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def latest_result(out_dir: Path) -> Path | None:
    """The newest suite JSON (``"benchmark": "suite"``) in ``out_dir``, or None."""
    cands = [p for p in Path(out_dir).glob("*.json") if _is_suite_json(p)]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def _is_suite_json(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("benchmark") == "suite"
    except Exception:
        return False


def report(path: Path, out_dir: Path) -> list[Path]:
    """Plots and README section of the suite JSON at ``path``, written to ``out_dir``; returns their paths."""
    data = json.loads(Path(path).read_text())
    pngs = make_plots(data, out_dir, stem=Path(path).stem)
    md_path = Path(out_dir) / "README_section.md"
    md_path.write_text(readme_section(data, path, pngs, out_dir))
    for p in (md_path, *pngs):
        print(f"wrote {p}", flush=True)
    return [md_path, *pngs]

STYLE = {  # method -> (colour, marker)
    "naive": ("tab:red", "o"), "chunked": ("tab:blue", "s"), "triton": ("tab:cyan", "D"),
    "triton-gemm": ("tab:olive", "d"),
    "torch_lce": ("tab:orange", "^"), "liger_flce": ("tab:purple", "v"), "liger_chunked": ("tab:pink", "P"),
    "cce": ("tab:green", "X"),
}
AXIS_LABEL = {"N": "tokens N", "V": "vocabulary V", "d": "hidden size d"}


def make_plots(data: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for prefix, sw in [("", sw) for sw in data.get("sweeps", [])] + [("scaling-", sw) for sw in data.get("scaling", [])]:
        axis, dt = sw["axis"], sw["dtype"]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        methods = sorted({m for p in sw["points"] for m in p["methods"]}, key=lambda m: list(STYLE).index(m)
                         if m in STYLE else 99)
        for m in methods:
            xs, ts, mem = [], [], []
            for p in sw["points"]:
                r = p["methods"].get(m, {})
                if "median_s" in r:
                    xs.append(p[axis])
                    ts.append(r["median_s"] * 1e3)
                    mem.append(max(r["peak_extra_mib"], 1e-2))
            if not xs:
                continue
            c, mk = STYLE.get(m, ("gray", "."))
            ax_t.plot(xs, ts, color=c, marker=mk, label=m)
            ax_m.plot(xs, mem, color=c, marker=mk, label=m)
        fx = [p[axis] for p in sw["points"] if "floor_s" in p.get("gemm", {})]
        fy = [p["gemm"]["floor_s"] * 1e3 for p in sw["points"] if "floor_s" in p.get("gemm", {})]
        if fx:
            ax_t.plot(fx, fy, "k--", label="6NdV GEMM floor")
        base = sw["base"]
        fixed = ", ".join(f"{k}={v}" for k, v in base.items() if k != axis)
        for ax, yl in ((ax_t, "fwd+bwd time (ms, median)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(AXIS_LABEL.get(axis, axis))
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        m = data.get("machine", {})
        fig.suptitle(f"SimNPO fwd+bwd vs {axis} ({dt}, {fixed}) -- {m.get('cpu', '')} x{m.get('cores', '')}"
                     f"{' ' + m['gpu'] if m.get('gpu') else ''}, {m.get('date', '')[:10]}"
                     f"{' (quick)' if data.get('quick') else ''}", fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-{prefix}{axis}-{dt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _fmt_ms(r):
    return f"{r['median_s'] * 1e3:.0f} ms (±{r['spread'] * 50:.0f}%)" if "median_s" in r else \
        ("skipped" if "skipped" in r else "error")


def readme_section(data: dict, json_path: Path, pngs: list[Path], out_dir: Path) -> str:
    """The markdown of bench/results/README_section.md (paths relative to the repository above ``out_dir``)."""
    rel = lambda p: os.path.relpath(p, Path(out_dir).parent.parent)  # noqa: E731  (paths from the repo root)
    L = _md_intro(data, rel(json_path)) + _md_check(data.get("check"))
    for h in data.get("headline", []):
        L += _md_headline(h, data.get("targets_max", {}))
    L += _md_scaling(data, [rel(p) for p in pngs], [p.stem for p in pngs]) + _md_step(data.get("step"))
    plan = data.get("plan")
    if plan and "rows" in plan:
        L += ["### Memory planner vs measured peak (`simnpo-fast plan`)", "", plan_table(plan), ""]
    elif plan:
        L.append(f"Planner validation failed: {plan.get('error', '')[:300]}")
    return "\n".join(L) + "\n"


def _md_intro(data: dict, json_rel: str) -> list[str]:
    m = data.get("machine", {})
    return [
        "## Benchmarks", "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores"
        + (f", {m['gpu']}" if m.get("gpu") else "") + f"; torch {m.get('torch')}, triton {m.get('triton')}, "
        + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()
                    if k in ("liger-kernel", "cut-cross-entropy") and v)
        + f". Date {m.get('date', '?')}, commit {m.get('git')}.",
        f"Command: `{data.get('command')}` ({data.get('seconds', 0) / 60:.1f} min)"
        + (" -- **quick mode on a shared CPU: noisy, indicative only**" if data.get("quick") else "")
        + f". Raw numbers: `{json_rel}`.",
        "",
        "Every method computes the same SimNPO loss (beta=2.5, mean over sequences) and its gradients w.r.t. the "
        "hidden states and the LM-head weight; the peers (torch `F.linear_cross_entropy`, Liger, Cut "
        "Cross-Entropy) give per-token cross-entropy (Liger's chunked framework: a per-sequence hook) and SimNPO "
        "is assembled on top. Each is checked against an fp64 oracle before it is timed. Labels are sampled from "
        "the head's own softmax (realistic logits). Time = median fwd+bwd over repeated runs (± half the "
        "min-max spread); memory = RSS / CUDA peak above the inputs in a fresh process, gradients included "
        "(the memory target is judged on that; the columns beyond the gradients drop the d hidden + d weight "
        "every exact method must return).",
        "",
    ]


def _md_check(chk: dict | None) -> list[str]:
    if not chk:
        return []
    L = ["### Correctness vs the fp64 oracle (relative max error of loss / d hidden / d weight)", "",
         "| method | dtype | shape (M, d, V) | loss | d hidden | d weight | verdict |", "|---|---|---|---|---|---|---|"]
    for r in chk["runs"]:
        for name, res in r["results"].items():
            shape = f"{r.get('M', r.get('N'))}, {r['d']}, {r['V']}" + (" (interpreter)" if r.get("interpreter") else "")
            if "error" in res:
                L.append(f"| {name} | {r['dtype']} | {shape} | - | - | - | error: {res['error'][:80]} |")
            else:
                verdict = "ok" if res["ok"] else "**differs: not timed**"
                L.append(f"| {name} | {r['dtype']} | {shape} | {res['loss']:.1e} | {res['dhidden']:.1e} | "
                         f"{res['dweight']:.1e} | {verdict} (tol {res['tol']:.0e}) |")
    una = {k: v for r in chk["runs"] for k, v in r.get("unavailable", {}).items()}
    L += [f"\n- `{k}` not run here: {v}" for k, v in una.items()]
    return L + [""]


def _md_method_row(name: str, r: dict, naive: dict) -> str:
    if "median_s" not in r:
        return f"| {name} | {_fmt_ms(r)} | | | | | | | |"
    vt = f"{r['median_s'] / naive['median_s']:.2f}x" if "median_s" in naive else "-"
    vm = f"{r['peak_extra_mib'] / naive['peak_extra_mib'] * 100:.1f}%" if "median_s" in naive else "-"
    beyond = r["peak_extra_mib"] - r.get("grads_mib", 0.0)
    nb = naive.get("peak_extra_mib", 0.0) - naive.get("grads_mib", 0.0)
    vb = f"{beyond / nb * 100:.1f}%" if "median_s" in naive and nb > 0 else "-"
    return (f"| {name} | {_fmt_ms(r)} | {r['gflops']:.1f} | {r.get('x_floor', float('nan')):.2f} | "
            f"{r['peak_extra_mib']:.0f} MiB | {vt} | {vm} | {beyond:.0f} MiB | {vb} |")


def _md_headline(h: dict, targets_max: dict) -> list[str]:
    g = h.get("gemm", {})
    L = [f"### SimNPO fwd+bwd at N={h['N']}, d={h['d']}, V={h['V']}, {h['dtype']}", ""]
    if "floor_s" in g:
        L += [f"GEMM rate measured in the same run: {g['gemm_gflops']:.1f} GFLOP/s; 6NdV floor "
              f"{g['floor_s'] * 1e3:.0f} ms.", ""]
    L += ["| method | time | GFLOP/s | x floor | peak memory | vs naive time | vs naive memory "
          "| beyond the gradients | vs naive beyond the gradients |", "|---|---|---|---|---|---|---|---|---|"]
    naive = h["methods"].get("naive", {})
    L += [_md_method_row(name, r, naive) for name, r in h["methods"].items()]
    t = h.get("targets", {})
    if t.get("met"):
        L += ["", f"Targets for `{t['method']}`: " + "; ".join(
            f"{k.replace('_', ' ')} {t[k]:.2f} (target <= {targets_max[k]}: "
            f"{'met' if t['met'][k] else '**not met**'})" for k in targets_max if k in t)
            + (f"; fastest peer: {t['best_peer']}." if t.get("best_peer") else ".")]
    return L + [""]


def _md_scaling(data: dict, png_rels: list[str], png_stems: list[str]) -> list[str]:
    L = []
    if png_rels:
        L += ["### Scaling", ""] + [f"![{s}]({p})" for s, p in zip(png_stems, png_rels)] + [""]
    for sw in data.get("scaling", []):
        L += _md_scaling_table(sw)
    skipped = [(p["N"], p["d"], p["V"], p["dtype"], mth, r["skipped"])
               for sw in data.get("sweeps", []) + data.get("scaling", [])
               for p in sw["points"] for mth, r in p["methods"].items()
               if "skipped" in r and not r["skipped"].startswith("time")]
    if skipped:
        L += ["Skipped (memory): " + "; ".join(f"{m} at N={n} d={d} V={v} {dt}" for n, d, v, dt, m, _ in
                                               sorted(set(skipped))) + ".", ""]
    return L


def _md_scaling_table(sw: dict) -> list[str]:
    """Time and peak memory above the inputs per method and N (the scaling stage); skipped points say so."""
    methods = sorted({m for p in sw["points"] for m in p["methods"]}, key=lambda m: list(STYLE).index(m)
                     if m in STYLE else 99)
    b = sw["base"]
    L = [f"Scaling in N at d={b['d']}, V={b['V']} ({sw['dtype']}): time / peak memory above the inputs "
         "(gradients included); 'out of memory' = estimated peak above the run's budget, not run; 'not run (time)' "
         "= its time extrapolated from the previous point exceeds the stage's cap.", "",
         "| N | GEMM floor | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for p in sw["points"]:
        cells = []
        for m in methods:
            r = p["methods"].get(m, {})
            cells.append(f"{r['median_s']:.2f} s / {r['peak_extra_mib']:.0f} MiB" if "median_s" in r else
                         "error" if "skipped" not in r else
                         "not run (time)" if r["skipped"].startswith("time") else "out of memory")
        floor = p.get("gemm", {}).get("floor_s")
        L.append(f"| {p['N']} | {f'{floor:.2f} s' if floor else '-'} | " + " | ".join(cells) + " |")
    return L + [""]


def _md_step(step: dict | None) -> list[str]:
    if not step:
        return []
    L = ["### One unlearning step end to end", ""]
    if "skipped" in step:
        L.append(f"Not run: {step['skipped']}.")
    else:
        L.append(f"`{step.get('command')}` (exit {step.get('returncode')}); its JSON is embedded in the suite JSON "
                 "under `step.result`.")
        if step.get("result"):
            L += ["", "```", step["stdout_tail"].strip()[-1500:], "```", "",
                  "(printed by `bench/step.py`, the trainer's end-to-end step benchmark)"]
    return L + [""]


def plan_table(plan: dict) -> str:
    L = ["| model | params | loss | seq x batch | predicted | measured | error |", "|---|---|---|---|---|---|---|"]
    for r in plan["rows"]:
        L.append(f"| {r['name']} | {r['params'] / 1e6:.1f} M | {r['loss']} | {r['seq']} x {r['batch']} | "
                 f"{r['predicted_mib']:.0f} MiB | {r['measured_mib']:.0f} MiB | {r['error'] * 100:+.1f}% |")
    return "\n".join(L)
