"""The TOFU study's results: mean and spread over seeds, the results page (Markdown table, bar chart, JSON)."""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import yaml

#: The results page's columns: key of an evaluation summary, header.
COLUMNS = (("forget/probability", "forget prob"), ("forget/rouge_l_recall", "forget ROUGE-L"),
           ("forget/truth_ratio", "forget truth ratio"), ("forget/truth_ratio_stat", "forget TR min(R,1/R)"),
           ("log10_forget_quality", "log10 forget quality"),
           ("retain/probability", "retain prob"), ("retain/rouge_l_recall", "retain ROUGE-L"),
           ("model_utility", "model utility"))

METRICS_TEXT = (
    "Metrics as the TOFU reference code computes them (protocol `{protocol}`): truth ratio R = geometric mean of "
    "the perturbed answers' length-normalised probabilities over the paraphrased one's; `forget truth ratio` = "
    "mean R, `forget TR min(R,1/R)` = TOFU's forget statistic; forget quality = KS-test p-value of the forget-set "
    "R vs the retain-only model's (log10, mean over seeds); model utility = harmonic mean of the 9 retain / "
    "real-authors / world-facts numbers. `+ relearn` = after the relearning attack.")


def summary_stats(rows: List[dict]) -> tuple[dict, dict]:
    """``(mean, std)`` over seeds of every summary key; forget quality is averaged in log10 space (its values
    span hundreds of decades): ``forget_quality`` = 10 ** mean log10, ``log10_forget_quality`` its mean and std."""
    keys = sorted(set().union(*[r.keys() for r in rows]))
    mean, std = {}, {}
    for k in keys:
        v = [r[k] for r in rows if r.get(k) is not None]
        if k == "forget_quality":
            lv = np.log10(np.maximum(v, 1e-300))
            mean[k], std[k] = float(10 ** lv.mean()), None
            mean["log10_forget_quality"], std["log10_forget_quality"] = float(lv.mean()), float(lv.std())
            continue
        if k == "log10_forget_quality":
            continue
        mean[k] = float(np.mean(v)) if v else None
        std[k] = float(np.std(v)) if v else None
    return mean, std


def machine() -> str:
    """CPU model and core count (wall times depend on them; the CPU may be shared)."""
    import platform

    from ..train.run_log import machine_info

    info = machine_info()
    return f"{info.get('cpu') or platform.processor() or platform.machine()}, {info['cores']} cores"


def write_study_results(study: dict, results_dir: str) -> Dict[str, str]:
    """``<name>.md`` (mean ± std over seeds of :data:`COLUMNS`, the config), ``<name>.png`` and ``<name>.json``
    in ``results_dir``; returns their paths (``markdown``, ``plot``, ``json``)."""
    from ..eval.result_files import bar_chart, markdown_table, save_json

    os.makedirs(results_dir, exist_ok=True)
    name = study["config"].get("name", "tofu-mini")
    rows, std = study["rows"], study["std"]
    md_rows = {}
    for n, r in rows.items():
        md_rows[n] = {k: (f"{r[k]:.3f} ± {std[n][k]:.3f}" if r.get(k) is not None and std[n].get(k) is not None
                          and len(study["seeds"]) > 1 else r.get(k)) for k, _ in COLUMNS}
    png = bar_chart(rows, os.path.join(results_dir, f"{name}.png"), columns=COLUMNS, errors=std,
                    title=f"{name}: mean over seeds {study['seeds']}")
    cfg = {k: v for k, v in study["config"].items() if not k.startswith("_")}
    md = [f"# {name}", "", f"Command: `{study['command']}`", "",
          f"Seeds: {study['seeds']}; wall time {study['elapsed_s'] / 60:.1f} min on "
          f"{study.get('machine', 'a 2-core CPU')} (shared with other jobs: wall times are upper bounds).", "",
          markdown_table(md_rows, COLUMNS), "", METRICS_TEXT.format(protocol=study.get("protocol", "tofu")), "",
          f"![{name}]({os.path.basename(png)})", "", "Config:", "", "```yaml",
          yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    md_path = os.path.join(results_dir, f"{name}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    js = save_json({k: v for k, v in study.items()}, os.path.join(results_dir, f"{name}.json"))
    return {"markdown": md_path, "plot": png, "json": js}
