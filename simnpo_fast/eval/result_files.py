"""The files of evaluation results: one JSON per evaluation, a Markdown summary table (and its plain-text form
for the terminal) and PNG plots (a bar chart per metric across models / methods, and curves over training steps
when the model was evaluated during training)."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Mapping, Optional, Sequence

#: Columns of the headline TOFU table (key in ``result["summary"]``, header).
TOFU_COLUMNS = (
    ("forget/probability", "forget prob"),
    ("forget/rouge_l_recall", "forget ROUGE-L"),
    ("forget/truth_ratio", "forget truth ratio"),
    ("forget/truth_ratio_stat", "forget TR min(R,1/R)"),
    ("forget_quality", "forget quality"),
    ("retain/probability", "retain prob"),
    ("retain/rouge_l_recall", "retain ROUGE-L"),
    ("model_utility", "model utility"),
)
MUSE_COLUMNS = (("verbmem_forget", "VerbMem forget"), ("knowmem_forget", "KnowMem forget"),
                ("knowmem_retain", "KnowMem retain"), ("privleak_auc", "Min-40% AUC"), ("privleak", "PrivLeak %"))


def save_json(obj, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)
    return path


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    v = float(v)
    if math.isnan(v):
        return "nan"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.4f}"


def columns_for(summaries: Sequence[Mapping]) -> tuple:
    keys = set().union(*[s.keys() for s in summaries]) if summaries else set()
    if any(k.startswith("forget/") for k in keys):
        return TOFU_COLUMNS
    if any(k.startswith(("verbmem", "knowmem", "privleak")) for k in keys):
        return MUSE_COLUMNS
    return tuple((k, k) for k in sorted(keys))


def table_rows(rows: Mapping[str, Mapping], columns=None) -> tuple[list[str], list[list[str]]]:
    """``rows``: ``{row name: summary dict}`` -> header + formatted cells."""
    columns = columns or columns_for(list(rows.values()))
    header = ["model"] + [h for _, h in columns]
    cells = [[name] + [fmt(s.get(k)) for k, _ in columns] for name, s in rows.items()]
    return header, cells


def markdown_table(rows: Mapping[str, Mapping], columns=None) -> str:
    header, cells = table_rows(rows, columns)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(out)


def text_table(rows: Mapping[str, Mapping], columns=None) -> str:
    header, cells = table_rows(rows, columns)
    widths = [max(len(r[i]) for r in [header] + cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells])


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(rows: Mapping[str, Mapping], path: str, columns=None, title: str = "",
              errors: Optional[Mapping[str, Mapping]] = None) -> str:
    """One panel per metric, one bar per row (model / method); ``errors`` (same shape) adds error bars;
    forget quality is drawn on a log scale."""
    plt = pyplot()
    columns = [c for c in (columns or columns_for(list(rows.values())))
               if any(s.get(c[0]) is not None for s in rows.values())]
    n = max(1, len(columns))
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.5, 3.4), squeeze=False)
    names = list(rows)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, head) in zip(axes[0], columns):
        vals = [rows[m].get(key) for m in names]
        vals = [float("nan") if v is None else float(v) for v in vals]
        err = None
        if errors:
            err = [float((errors.get(m) or {}).get(key) or 0.0) for m in names]
        ax.bar(range(len(names)), vals, yerr=err, color=[colors[i % len(colors)] for i in range(len(names))],
               capsize=3)
        if key == "forget_quality":
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title(head, fontsize=9)
    return save_figure(plt, fig, path, title)


def save_figure(plt, fig, path: str, title: str = "") -> str:
    """Title, layout, write ``path`` (folders created) and close the figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(history: Sequence[Mapping], path: str, keys: Optional[Sequence[str]] = None, title: str = "") -> str:
    """Metrics over training: ``history`` = ``[{"step": s, "summary": {...}}, ...]`` (see ``eval.hook``)."""
    plt = pyplot()
    keys = keys or [k for k, _ in TOFU_COLUMNS]
    keys = [k for k in keys if any(h["summary"].get(k) is not None for h in history)]
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n + 0.5, 3.0), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [h["summary"].get(k, float("nan")) for h in history], marker="o", ms=3)
        if k == "forget_quality":
            ax.set_yscale("log")
        ax.set_title(dict(TOFU_COLUMNS).get(k, k), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    return save_figure(plt, fig, path, title)


def write_report(results: Mapping[str, Mapping], out_dir: str, *, title: str = "Evaluation",
                 history: Optional[Sequence[Mapping]] = None, notes: str = "") -> Dict[str, str]:
    """Write ``<name>.json`` per result, ``summary.md``, ``metrics.png`` (+ ``curves.png`` with ``history``).
    ``results`` maps a row name (model / method) to an evaluation result (with ``"summary"``)."""
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    for name, res in results.items():
        paths[name] = save_json(res, os.path.join(out_dir, f"{name}.json"))
    rows = {n: r["summary"] for n, r in results.items()}
    md = [f"# {title}", "", markdown_table(rows), ""]
    if notes:
        md += [notes, ""]
    paths["plot"] = bar_chart(rows, os.path.join(out_dir, "metrics.png"), title=title)
    md += ["![metrics](metrics.png)", ""]
    if history:
        paths["curves"] = curves(history, os.path.join(out_dir, "curves.png"), title=title + " (during training)")
        save_json(list(history), os.path.join(out_dir, "history.json"))
        md += ["![curves](curves.png)", ""]
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    paths["markdown"] = os.path.join(out_dir, "summary.md")
    return paths
