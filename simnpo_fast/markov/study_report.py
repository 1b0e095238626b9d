"""Summary statistics, plots and the Markdown report of the Markov-chain study.

The paper-style figure (``<name>.png``) plots, per setting, the KL to the retrained model on the forget data
(pooled, forget1, forget2) against the KL on the retain data, one curve per method through the evaluation
points, mean over seeds, shaded between the seeds' lowest and highest forget KL. ``<name>-weights.png`` shows
the forget KLs over the iterations and the per-sequence gradient weights ``w`` on forget1 vs forget2 (see
:mod:`.core`).
"""
from __future__ import annotations

import datetime as _dt
import os
from typing import Dict, List, Optional

import numpy as np

from ..eval.result_files import pyplot, save_figure, save_json  # noqa: F401  (save_json re-exported for the driver)
from ..methods import get_method

KL_KEYS = [f"kl_{k}/{c}" for k in ("retrain", "true") for c in ("retain", "forget1", "forget2", "forget")]
WEIGHT_KEYS = ["weight/forget1", "weight/forget2", "push_share/forget1"]


def _curves(runs: List[dict], method: str, key: str) -> np.ndarray:
    return np.array([[p[key] for p in r["methods"][method]] for r in runs], dtype=np.float64)


def _matched(runs: List[dict], method: str, budget_x: float) -> List[Optional[float]]:
    """Per seed: the lowest pooled forget KL (to the retrained model) among the evaluation points whose retain
    KL is at most ``budget_x`` times the pretrained model's (iteration 0; None when no point qualifies)."""
    out = []
    for r in runs:
        traj = r["methods"][method]
        budget = budget_x * traj[0]["kl_retrain/retain"]
        ok = [p["kl_retrain/forget"] for p in traj if p["kl_retrain/retain"] <= budget]
        out.append(min(ok) if ok else None)
    return out


def _ms(v) -> dict:
    v = [x for x in v if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v)) if v else None, "n": len(v)}


def summarize(study: dict) -> Dict[str, dict]:
    """Per setting: mean / std curves over seeds, final points, matched-retain comparison, weight summary."""
    out = {}
    budgets = study["config"].get("report", {}).get("retain_budgets_x", [])
    for setting in study["config"]["settings"]:
        runs = [r for r in study["runs"] if r["setting"] == setting]
        if not runs:
            continue
        s = {"iterations": [p["iteration"] for p in runs[0]["methods"][study["methods"][0]]], "methods": {},
             "retrained_kl_true": {c: _ms([r["retrained_kl_true"][c] for r in runs])
                                   for c in runs[0]["retrained_kl_true"]}}
        for m in study["methods"]:
            curves = {k: _curves(runs, m, k) for k in KL_KEYS + WEIGHT_KEYS}
            s["methods"][m] = {
                "mean": {k: v.mean(0).tolist() for k, v in curves.items()},
                "std": {k: v.std(0).tolist() for k, v in curves.items()},
                "min": {k: v.min(0).tolist() for k, v in curves.items()},
                "max": {k: v.max(0).tolist() for k, v in curves.items()},
                "final": {k: _ms(v[:, -1]) for k, v in curves.items()},
                "start": {k: _ms(v[:, 0]) for k, v in curves.items()},
                "run_mean": {k: _ms(v.mean(1)) for k, v in curves.items() if k in WEIGHT_KEYS},
                "matched": {str(b): _ms(_matched(runs, m, b)) for b in budgets},
            }
        out[setting] = s
    return out


def _style(study: dict, m: str, i: int):
    """``(colour, line style)`` of method label ``m``: the config's ``report.styles.<m>``, else the ``i``-th
    colour of the cycle, solid."""
    style = study["config"].get("report", {}).get("styles", {}).get(m)
    return tuple(style) if style else (f"C{i % 10}", "-")


def plot_tradeoff(study: dict, path: str) -> str:
    """Forget KL vs retain KL (to the retrained model) per setting: pooled forget, forget1, forget2."""
    plt = pyplot()
    settings = list(study["summary"])
    cols = (("forget", "forget (pooled)"), ("forget1", "forget1"), ("forget2", "forget2"))
    fig, axes = plt.subplots(len(settings), 3, figsize=(13, 3.8 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        s = study["summary"][setting]
        for col, (c, label) in enumerate(cols):
            ax = axes[row, col]
            for i, (m, d) in enumerate(s["methods"].items()):
                color, ls = _style(study, m, i)
                x, y = np.array(d["mean"]["kl_retrain/retain"]), np.array(d["mean"][f"kl_retrain/{c}"])
                lo, hi = np.array(d["min"][f"kl_retrain/{c}"]), np.array(d["max"][f"kl_retrain/{c}"])
                ax.plot(x, y, ls, color=color, label=m, lw=1.5)
                ax.fill(np.r_[x, x[::-1]], np.r_[lo, hi[::-1]], color=color, alpha=0.12, lw=0)
                ax.plot(x[-1], y[-1], "x", color=color)
            ax.plot(x[0], y[0], "ko", ms=5, label="pretrained (start)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("KL to retrained, retain (nats/token)")
            ax.set_ylabel(f"KL to retrained, {label}")
            ax.set_title(f"{study['config']['settings'][setting].get('title', setting)}", fontsize=8)
            ax.grid(alpha=0.3, which="both")
        axes[row, 0].legend(fontsize=7)
    return save_figure(plt, fig, path, f"{study['name']}: mean over seeds {study['seeds']} (band: lowest to highest "
                                 f"seed's forget KL; x = end of run)")


def plot_weights(study: dict, path: str) -> str:
    """Forget1 / forget2 KL over iterations, NPO vs SimNPO per-sequence weights, forget1's share of the push."""
    plt = pyplot()
    settings = list(study["summary"])
    fig, axes = plt.subplots(len(settings), 4, figsize=(16, 3.6 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        s = study["summary"][setting]
        it = np.array(s["iterations"])
        for i, (m, d) in enumerate(s["methods"].items()):
            color, ls = _style(study, m, i)
            for col, key in enumerate(("kl_retrain/forget1", "kl_retrain/forget2")):
                axes[row, col].plot(it, d["mean"][key], ls, color=color, label=m)
                axes[row, col].fill_between(it, d["min"][key], d["max"][key], color=color, alpha=0.12, lw=0)
            if get_method(study["config"]["methods"][m]["objective"]).per == "sequence":
                axes[row, 2].plot(it, d["mean"]["weight/forget1"], ls, color=color, label=f"{m} forget1")
                axes[row, 2].plot(it, d["mean"]["weight/forget2"], ls, color=color, alpha=0.45, lw=2.5,
                                  label=f"{m} forget2")
            axes[row, 3].plot(it, d["mean"]["push_share/forget1"], ls, color=color, label=m)
        titles = ("KL to retrained, forget1", "KL to retrained, forget2",
                  "mean weight w (dark: forget1, light: forget2)", "forget1 share of sum w*n")
        for col, t in enumerate(titles):
            ax = axes[row, col]
            ax.set_title(f"{setting}: {t}", fontsize=8)
            ax.set_xlabel("unlearning iteration")
            ax.grid(alpha=0.3)
            if col < 3:  # weights too: NPO's start at 1, SimNPO's at ~2/n * sigmoid(mean log p)
                ax.set_yscale("log")
        axes[row, 2].legend(fontsize=6)
        axes[row, 3].legend(fontsize=6)
    return save_figure(plt, fig, path,
                       f"{study['name']}: mean over seeds {study['seeds']} (band: lowest to highest seed)")


def _f(d: Optional[dict], digits: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "-"
    if d.get("std") is None or d.get("n", 1) < 2:
        return f"{d['mean']:.{digits}g}"
    return f"{d['mean']:.{digits}g} ± {d['std']:.2g}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _kl_table(study: dict, setting: str) -> List[str]:
    s = study["summary"][setting]
    cols = [f"kl_retrain/{c}" for c in ("retain", "forget1", "forget2", "forget")] + \
           [f"kl_true/{c}" for c in ("retain", "forget1", "forget2")]
    first = next(iter(s["methods"].values()))
    rows = [["pretrained (start)"] + [_f(first["start"][k]) for k in cols],
            ["retrained (reference)"] + ["0"] * 4 + [_f(s["retrained_kl_true"][k.split("/")[1]]) for k in cols[4:]]]
    rows += [[m] + [_f(d["final"][k]) for k in cols] for m, d in s["methods"].items()]
    head = ["model", "retain", "forget1", "forget2", "forget (pooled)", "retain (true)", "forget1 (true)",
            "forget2 (true)"]
    return _table(head, rows)


def _matched_table(study: dict, setting: str) -> List[str]:
    s = study["summary"][setting]
    budgets = study["config"].get("report", {}).get("retain_budgets_x", [])
    rows = [[m] + [f"{_f(d['matched'][str(b)])} ({d['matched'][str(b)]['n']}/{len(study['seeds'])})"
                   for b in budgets] for m, d in s["methods"].items()]
    return _table(["method"] + [f"retain KL <= {b}x pretrained" for b in budgets], rows)


def _weight_table(study: dict, setting: str) -> List[str]:
    s = study["summary"][setting]
    rows = []
    for m, d in s["methods"].items():
        rows.append([m] + [_f(d[w][k]) for w in ("start", "run_mean") for k in WEIGHT_KEYS])
    head = ["method", "w forget1 (start)", "w forget2 (start)", "forget1 push share (start)",
            "w forget1 (run mean)", "w forget2 (run mean)", "forget1 push share (run mean)"]
    return _table(head, rows)


def _compare(study: dict, setting: str, a: str, b: str) -> List[str]:
    """Data-driven sentences: ``a`` vs ``b`` at matched retain KL, at the end, and in weight allocation."""
    s = study["summary"][setting]["methods"]
    if a not in s or b not in s:
        return []
    pairs, wins = [], 0
    for budget, ma in s[a]["matched"].items():
        mb = s[b]["matched"][budget]
        if ma["mean"] is None or mb["mean"] is None:
            continue
        wins += ma["mean"] < mb["mean"]
        pairs.append(f"{budget}x: {_f(ma)} vs {_f(mb)}")
    fa, fb = s[a]["final"], s[b]["final"]
    share = {m: (s[m]["start"]["push_share/forget1"]["mean"], s[m]["run_mean"]["push_share/forget1"]["mean"])
             for m in (a, b)}
    closer = a if abs(share[a][1] - 0.5) < abs(share[b][1] - 0.5) else b
    return [f"* **{a} vs {b}**: lower pooled forget KL at equal retain KL in **{wins} of {len(pairs)}** budgets "
            f"({'; '.join(pairs)}). End of the run: forget KL {_f(fa['kl_retrain/forget'])} vs "
            f"{_f(fb['kl_retrain/forget'])}, retain KL {_f(fa['kl_retrain/retain'])} vs "
            f"{_f(fb['kl_retrain/retain'])}. Forget1's share of the push at the start / averaged over the run: "
            f"{share[a][0]:.2f} / {share[a][1]:.2f} vs {share[b][0]:.2f} / {share[b][1]:.2f} (0.5 = the same push "
            f"per sequence on both chains; closer to it over the run: {closer}). Weight left at the end of the run "
            f"(w end / w start), forget1 / forget2: {_kept(s[a])} ({a}) vs {_kept(s[b])} ({b})."]


def _kept(d: dict) -> str:
    keys = ("weight/forget1", "weight/forget2")
    return " / ".join(f"{d['final'][k]['mean'] / d['start'][k]['mean']:.2g}" for k in keys)


CAVEATS = [
    "Scale, read with the tables: the two forget losses weight a *summed* log-likelihood, NPO with w = 1 at the "
    "start, SimNPO with w ~ (2/n) sigmoid(mean log p), 1-2 orders of magnitude less. AdamW normalises the step "
    "of a single loss, so without a retain term the scale does not matter, but with a retain NLL of weight 1 the "
    "two methods sit at different points of the forget / retain balance; the matched-retain table compares them "
    "at equal retain damage, which accounts for that only as far as the trajectories reach the same retain KL.",
    "The runs are 50 iterations long (the reference's); every forget loss here eventually over-unlearns (the "
    "forget KL to the retrained model falls, then grows again), so the lowest point of a trajectory within a "
    "retain budget is an early-stopped result, and the end of the run is the reference protocol's result.",
]


def protocol_lines(cfg: dict) -> List[str]:
    d, u, p, mdl = cfg["data"], cfg["unlearn"], cfg["pretrain"], cfg["model"]
    meth = "; ".join(f"{m}: {spec}" for m, spec in cfg["methods"].items())
    sets = "; ".join(f"**{k}**: {v.get('title', k)} (pretrained on {'+'.join(v['pretrain_on'])})"
                     for k, v in cfg["settings"].items())
    return [f"{d['n_states']} states, leakage {d['leakage']}; sequences per chain {d['sizes']}, lengths "
            f"{d['lengths']} (settings override them), {int(d['test_frac'] * 100)}% held out; the KLs are token "
            f"means over {d['n_eval']} held-out sequences per chain. Settings: {sets}. Model: Llama "
            f"{mdl['num_hidden_layers']} layers, {mdl['num_attention_heads']} heads, width {mdl['hidden_size']}, "
            f"MLP {mdl['intermediate_size']}, one token per state. Pretraining and retraining (retain only): "
            f"{p['epochs']} epochs, batch {p['batch_size']}, AdamW lr {p['lr']}. Unlearning: {u['iterations']} "
            f"iterations, batch {u['batch_size']} forget (+ {u['batch_size']} retain for +RT / GradDiff), AdamW "
            f"lr {u['lr']}, evaluated at iterations 0-{u.get('eval_dense', 0)} and every {u['eval_every']}th after. "
            f"Methods: {meth}."]


def _checks_lines(study: dict) -> List[str]:
    ps = [c["p_value"] for r in study["runs"] for c in r["checks"].values()]
    kls = [abs(c["true_chain_kl"]) for r in study["runs"] for c in r["checks"].values()]
    return [f"* Data: Pearson chi-square of every chain's transitions against its own matrix, {len(ps)} cases "
            f"(seed x setting x chain): smallest p-value {min(ps):.3g} (Bonferroni 1% level: {0.01 / len(ps):.2g}).",
            f"* Metric: KL of each true chain to itself through the evaluation path: at most {max(kls):.2g} nats."]


def _header_lines(study: dict) -> List[str]:
    t, mach = study["timing"], study["machine"]
    date = t.get("date") or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    cpu_min = t.get("jobs_cpu_s", float("nan")) / 60
    w = max(1, int(t["workers"]))
    return [f"# {study['name']}: the SimNPO paper's mixture-of-Markov-chains study", "",
            f"Command: `{study['command'] or 'simnpo_fast.studies.markov.run(...)'}`", "",
            f"Run {date}: wall time **{t['elapsed_s'] / 60:.1f} min** (models {t['models_s'] / 60:.1f} min, "
            f"unlearning + evaluation {t['unlearn_s'] / 60:.1f} min); the jobs used {cpu_min:.1f} CPU-min, about "
            f"{cpu_min / w:.1f} min of wall time on {w} idle core(s). {w} worker process(es) x "
            f"{study['config'].get('threads', 1)} torch thread; {mach.get('cpu', '?')} "
            f"({', '.join(mach.get('flags', []))}), {mach.get('cores')} cores, load average {t['loadavg_start']} at "
            f"the start and {t['loadavg_end']} at the end (the cores were shared with other jobs when the load "
            f"exceeds the worker count).", "",
            "Reference protocol: OPTML-Group/Unlearn-Simple, `synthetic/` (`run_synthetic.sh`, "
            "`data_generation.py`, `unlearn_utils.py`, `evaluate_utils.py`), re-implemented in "
            "`simnpo_fast/markov/`; every loss and KL goes through the project's fused LM-head path.", "",
            "## Protocol", ""] + protocol_lines(study["config"]) + [
            "", "KL = token mean of KL(q || model) over held-out targets; q = the retrained (retain-only) model "
            "(\"to retrained\", lower is better on every chain) or the true transition row of the sequence's chain "
            "(\"true\"; on the forget chains the retrained model's value is the target, the pretrained one's is "
            "what unlearning should leave). w = the weight of grad log p(y_i) per sequence (SimNPO: "
            "(2/n) sigmoid((beta/n) log p + gamma); NPO: 2 sigmoid(beta (log p - log p_ref)); GA / GradDiff: "
            "1 / mean length), measured on the held-out forget1 / forget2 sequences; push share = forget1's "
            "part of sum_i w_i n_i.", "", "## Checks", ""] + _checks_lines(study)


def _setting_lines(study: dict, setting: str) -> List[str]:
    title = study["config"]["settings"][setting].get("title", setting)
    last = study["summary"][setting]["iterations"][-1]
    return (["", f"## {setting}: {title}", "",
             f"End of unlearning (iteration {last}), KL in nats/token, mean ± std over seeds:", ""]
            + _kl_table(study, setting)
            + ["", "Lowest pooled forget KL (to retrained) among the evaluation points whose retain KL is within a "
               "multiple of the pretrained model's (seeds with such a point):", ""] + _matched_table(study, setting)
            + ["", "Per-sequence gradient weights on held-out forget sequences:", ""] + _weight_table(study, setting)
            + ["", "Reading (computed from the tables above):", ""]
            + [line for a, b in study["config"].get("report", {}).get("compare", [])
               for line in _compare(study, setting, a, b)])


def write_markdown(study: dict, path: str, plots: Dict[str, str]) -> str:
    lines = _header_lines(study)
    for setting in study["summary"]:
        lines += _setting_lines(study, setting)
    lines += ["", "## Caveats", ""] + [f"* {c}" for c in CAVEATS]
    lines += ["", "## Plots", ""] + [f"![{k}]({os.path.basename(v)})" for k, v in plots.items()] + [""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def write_results(study: dict, results_dir: str) -> Dict[str, str]:
    """``<name>.json``, ``<name>.png``, ``<name>-weights.png`` and ``<name>.md`` in ``results_dir``."""
    name = study["name"]
    plots = {"trade-off": plot_tradeoff(study, os.path.join(results_dir, f"{name}.png")),
             "weights": plot_weights(study, os.path.join(results_dir, f"{name}-weights.png"))}
    md = write_markdown(study, os.path.join(results_dir, f"{name}.md"), plots)
    js = save_json({k: v for k, v in study.items() if k != "files"}, os.path.join(results_dir, f"{name}.json"))
    return {"markdown": md, "json": js, **plots}


def text_summary(study: dict) -> str:
    out = []
    for setting, s in study["summary"].items():
        out.append(f"{setting}: end of run, KL to retrained (retain / forget pooled / forget1 / forget2)")
        for m, d in s["methods"].items():
            f = d["final"]
            out.append(f"  {m:10s} " + "  ".join(_f(f[f'kl_retrain/{c}']) for c in
                                                  ("retain", "forget", "forget1", "forget2")))
    return "\n".join(out)
