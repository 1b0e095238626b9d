"""What a run reports: a rank-0 progress bar, a JSONL step log, a PNG plot of the curves, peak memory, and the
machine it ran on."""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch


class JsonlLogger:
    """One JSON object per line. On resume (``append``) the lines of steps after ``truncate_after`` (written by a
    run that died before its next checkpoint) are dropped, so the log matches the resumed trajectory."""

    def __init__(self, path: str, *, enabled: bool = True, append: bool = False, truncate_after: Optional[int] = None):
        self.enabled = enabled
        self.f = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        keep = []
        if append and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if truncate_after is None or rec.get("step", 0) <= truncate_after:
                        keep.append(line if line.endswith("\n") else line + "\n")
        self.f = open(path, "w", encoding="utf-8")
        self.f.writelines(keep)
        self.f.flush()

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def progress(total: int, initial: int = 0, enabled: bool = True, desc: str = ""):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def read_log(path: str) -> list:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def plot_curves(log_path: str, png_path: str, title: str = "") -> Optional[str]:
    """Loss terms, forget log-likelihood, grad norm, lr, tokens/s vs step."""
    if not os.path.isfile(log_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    if not recs:
        return None
    steps = [r["step"] for r in recs]
    panels = [("loss", ["loss", "forget_loss", "retain_loss"]), ("log-likelihood", ["forget_loglik", "retain_loglik"]),
              ("grad norm", ["grad_norm"]), ("lr", ["lr"]), ("tokens/s", ["tokens_per_s"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (label, keys) in zip(axes, panels):
        for k in keys:
            ys = [r.get(k) for r in recs]
            pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax.set_title(label)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def peak_memory_mb(dev: torch.device) -> float:
    """Peak memory of this process in MiB: the CUDA allocator's peak on a GPU, else the resident-set high-water
    mark ``VmHWM`` of ``/proc/self/status`` (NaN where there is none)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict:
    """CPU model and vector flags, cores, torch version, load average (a run's wall time depends on them; the CPU
    may be shared)."""
    info = {"cores": os.cpu_count(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, StopIteration):
        pass
    info["loadavg"] = load_average()
    return info


def load_average() -> Optional[List[float]]:
    """``/proc/loadavg``'s 1, 5 and 15 minute load averages (None where there is none)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None
