"""The benchmark suite: every method side by side, scaling sweeps, GEMM floor, end-to-end step, planner check.

    python -m bench.suite --quick            # < 10 min on a 2-core CPU: JSON + PNG plots + README section
    python -m bench.suite                    # full sweeps (long)
    python -m bench.suite --report           # only regenerate plots + README section from the newest JSON
    simnpo-fast bench [--quick] [--report]   # the same, from anywhere inside a source checkout

Stages (``--stages`` picks a subset; each measurement is a fresh subprocess, see bench/sweep.py):
  check     every method vs the fp64 oracle (ReferenceBackend(float64)) on the loss, d hidden and d weight, in fp32
            and bf16: at a tiny shape (all methods; Triton ones -- ours and Liger's FLCE -- under
            TRITON_INTERPRET=1 on CPU) and at a bench-sized shape (the methods timed at full size). A method
            that fails is reported with its errors and never timed.
  headline  N=2048 tokens, d=512, V=32000 (the issue's target shape), fp32 and bf16: median time, spread, peak
            memory, GFLOP/s and x the 6NdV floor at the GEMM rate measured in the same run; target ratios.
  sweeps    time and peak memory vs N, vs V and vs d (fp32; + bf16 in full mode); points whose estimated peak
            exceeds half the free memory are skipped and listed. Full mode: a fresh process per (method, point);
            quick mode: one fresh process per method measures all its points (start-up / compile paid once).
  step      python -m bench.step (the trainer's end-to-end step benchmark) if bench/step.py exists.
  plan      python -m bench.plan_validate: planner prediction vs measured peak of small Llama models.
Output: bench/results/<machine>-<date>[-quick].json, PNG plots next to it, bench/results/README_section.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, machine_info, machine_tag, mem_available_mib, run_worker

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"time_vs_naive": 0.9, "memory_vs_naive": 0.10, "time_vs_floor": 1.15, "time_vs_best_peer": 1.0}
CPU_FULL = ("naive", "chunked", "torch_lce", "liger_chunked", "cce")  # timed at full size on CPU
CPU_TINY = ("triton", "triton-gemm", "liger_flce")  # Triton kernels: CPU only under the interpreter, tiny sizes
GPU_ALL = ("naive", "chunked", "triton", "triton-gemm", "torch_lce", "liger_flce", "liger_chunked", "cce")


def config(quick: bool, gpu: bool) -> dict:
    if quick:
        return {
            "repeats": 2, "gemm_repeats": 2,
            "check_tiny": {"N": 64, "d": 48, "V": 300, "seq_len": 16},
            "check_mid": {"N": 512, "d": 128, "V": 4096, "seq_len": 128},
            "headline": {"N": 2048, "d": 512, "V": 32000, "dtypes": ["fp32", "bf16"]},
            "sweep_base": {"N": 512, "d": 256, "V": 8192},
            # torch_lce's CPU path is slowest at large V / small d: 131072 cost it 8 of the 17 min of the first run
            "sweeps": {"N": [512, 2048, 4096], "V": [8192, 32768, 65536], "d": [128, 256, 512]},
            "shared_process": True,  # one process per (method, dtype) for all sweep points
            "sweep_dtypes": ["fp32"],
            "plan_args": ["--quick"],
        }
    return {
        "repeats": 5, "gemm_repeats": 3,
        "check_tiny": {"N": 64, "d": 48, "V": 300, "seq_len": 16},
        "check_mid": {"N": 2048, "d": 512, "V": 32000, "seq_len": 256},
        "headline": {"N": 2048, "d": 512, "V": 32000, "dtypes": ["fp32", "bf16"]},
        "sweep_base": {"N": 2048, "d": 512, "V": 32000},
        "sweeps": {"N": [512, 1024, 2048, 4096, 8192, 16384], "V": [8192, 16384, 32000, 65536, 131072, 262144],
                   "d": [256, 512, 1024, 2048, 4096]},
        "sweep_dtypes": ["fp32", "bf16"],
        "plan_args": [],
    }


def _log(msg: str) -> None:
    print(msg, flush=True)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("simnpo-fast", "torch", "triton", "liger-kernel", "cut-cross-entropy", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------------------
def _pt(shape: dict) -> list[str]:
    out = ["--N", str(shape["N"]), "--d", str(shape["d"]), "--V", str(shape["V"])]
    if "seq_len" in shape:
        out += ["--seq-len", str(shape["seq_len"])]
    return out


def stage_check(cfg: dict, gpu: bool) -> dict:
    """Correctness of every method vs the fp64 oracle; returns {"runs": [...], "passed": {dtype: [methods]}}."""
    runs = []
    full = GPU_ALL if gpu else CPU_FULL
    plans = [("tiny", cfg["check_tiny"], full, None), ("mid", cfg["check_mid"], full, None)]
    if not gpu:
        plans.insert(1, ("tiny", cfg["check_tiny"], CPU_TINY, {"TRITON_INTERPRET": "1"}))
    for label, shape, methods, env in plans:
        t0 = time.perf_counter()
        try:
            rs = run_worker("bench.sweep", ["--check", "--dtype", "fp32,bf16", "--methods", ",".join(methods),
                                            *_pt(shape)], env=env)["checks"]
        except Exception as e:  # the whole worker failed: every method in it fails
            rs = [{"dtype": dt, **shape, "results": {m: {"ok": False, "error": str(e)[-500:]} for m in methods},
                   "unavailable": {}} for dt in ("fp32", "bf16")]
        for r in rs:
            r.update(stage=label, interpreter=bool(env), seconds=(time.perf_counter() - t0) / len(rs))
            runs.append(r)
            for m, res in r["results"].items():
                err = res.get("error")
                desc = (f"ERROR {err[:100]}" if err else
                        f"loss {res['loss']:.1e} dh {res['dhidden']:.1e} dW {res['dweight']:.1e} (max); "
                        f"dh {res['dhidden_norm']:.1e} dW {res['dweight_norm']:.1e} (norm); tol {res['tol']:.0e} "
                        f"on {res.get('criterion')}")
                _log(f"  check {label:4s} {r['dtype']} {m:14s} {'ok  ' if res['ok'] else 'FAIL'} {desc}")
            for m, note in r.get("unavailable", {}).items():
                _log(f"  check {label:4s} {r['dtype']} {m:14s} n/a  {note}")
    passed = {}
    for dt in ("fp32", "bf16"):
        status: dict[str, bool] = {}
        for r in runs:
            if r["dtype"] != dt:
                continue
            for m, res in r["results"].items():
                status[m] = status.get(m, True) and bool(res.get("ok"))
        passed[dt] = sorted(m for m, ok in status.items() if ok)
    return {"runs": runs, "passed": passed}


def _measure(method: str, N: int, d: int, V: int, dt: str, repeats: int, budget_mib: float) -> dict:
    from bench.sweep import est_peak_mib

    elt = 4 if dt == "fp32" else 2
    est = est_peak_mib(method, N, d, V, elt)
    base = {"method": method, "dtype": dt, "N": N, "d": d, "V": V}
    if est > budget_mib:
        return {**base, "skipped": f"estimated peak {est:.0f} MiB > budget {budget_mib:.0f} MiB"}
    try:
        return run_worker("bench.sweep", ["--method", method, "--dtype", dt, "--N", str(N), "--d", str(d), "--V", str(V),
                                          "--repeats", str(repeats)])
    except Exception as e:
        return {**base, "error": str(e)[-800:]}


def _point(methods, N, d, V, dt, cfg, budget, cache: dict) -> dict:
    """GEMM floor + every method at one point (cached: sweeps share their base point)."""
    key = (N, d, V, dt)
    if key in cache:
        return cache[key]
    gemm = _measure("gemm", N, d, V, dt, cfg["gemm_repeats"], budget)
    rows = {}
    for m in methods:
        r = _measure(m, N, d, V, dt, cfg["repeats"], budget)
        if "median_s" in r and "floor_s" in gemm:
            r["x_floor"] = r["median_s"] / gemm["floor_s"]
        rows[m] = r
        if "median_s" in r:
            _log(f"  {dt} N={N:<6d} d={d:<5d} V={V:<7d} {m:14s} {r['median_s']*1e3:9.1f} ms "
                 f"(spread {r['spread']*100:4.1f}%)  peak +{r['peak_extra_mib']:8.1f} MiB  {r['gflops']:7.1f} GFLOP/s"
                 + (f"  {r['x_floor']:.2f}x floor" if "x_floor" in r else ""))
        else:
            _log(f"  {dt} N={N:<6d} d={d:<5d} V={V:<7d} {m:14s} {r.get('skipped') or 'ERROR ' + r.get('error', '')[-200:]}")
    if "floor_s" in gemm:
        _log(f"  {dt} N={N:<6d} d={d:<5d} V={V:<7d} {'6NdV floor':14s} {gemm['floor_s']*1e3:9.1f} ms  "
             f"(GEMM {gemm['gemm_gflops']:.1f} GFLOP/s)")
    out = {"N": N, "d": d, "V": V, "dtype": dt, "gemm": gemm, "methods": rows}
    cache[key] = out
    return out


def targets(point: dict, ours: str) -> dict:
    """The issue's target ratios for ``ours`` at one point (None where a side is missing)."""
    ms = point["methods"]
    o, naive = ms.get(ours, {}), ms.get("naive", {})
    gemm = point.get("gemm", {})
    out = {"method": ours, "dtype": point["dtype"], "N": point["N"], "d": point["d"], "V": point["V"]}
    if "median_s" not in o:
        return out
    if "median_s" in naive:
        out["time_vs_naive"] = o["median_s"] / naive["median_s"]
        out["memory_vs_naive"] = o["peak_extra_mib"] / naive["peak_extra_mib"]
    if "floor_s" in gemm:
        out["time_vs_floor"] = o["median_s"] / gemm["floor_s"]
    peers = {m: r["median_s"] for m, r in ms.items() if r.get("median_s") and m not in ("naive", "chunked", "triton", "triton-gemm")}
    if peers:
        best = min(peers, key=peers.get)
        out["best_peer"] = best
        out["time_vs_best_peer"] = o["median_s"] / peers[best]
        out["time_vs_peers"] = {m: o["median_s"] / t for m, t in peers.items()}
    out["met"] = {k: out[k] <= v for k, v in TARGETS.items() if k in out}
    return out


def stage_timing(cfg: dict, passed: dict, gpu: bool, budget: float, cache: dict) -> tuple[list, list]:
    ours = "triton" if gpu else "chunked"
    pool = GPU_ALL if gpu else CPU_FULL
    head = cfg["headline"]
    headline = []
    for dt in head["dtypes"]:
        methods = [m for m in pool if m in passed.get(dt, [])]
        _log(f"\n[headline] {dt}: {', '.join(methods)}")
        pt = _point(methods, head["N"], head["d"], head["V"], dt, cfg, budget, cache)
        pt["targets"] = targets(pt, ours)
        headline.append(pt)
    return headline, [m for m in pool]


def stage_sweeps(cfg: dict, passed: dict, gpu: bool, budget: float, cache: dict) -> list:
    pool = GPU_ALL if gpu else CPU_FULL
    base = cfg["sweep_base"]
    if cfg.get("shared_process"):
        _prefill(cfg, pool, passed, budget, cache)
    out = []
    for dt in cfg["sweep_dtypes"]:
        methods = [m for m in pool if m in passed.get(dt, [])]
        for axis, values in cfg["sweeps"].items():
            _log(f"\n[sweep {axis}] {dt} (base N={base['N']} d={base['d']} V={base['V']})")
            pts = []
            for v in values:
                shape = {**base, axis: v}
                pts.append(_point(methods, shape["N"], shape["d"], shape["V"], dt, cfg, budget, cache))
            out.append({"axis": axis, "dtype": dt, "base": base, "points": pts})
    return out


def _prefill(cfg, pool, passed, budget, cache) -> None:
    """Quick mode: one process per (method, dtype) measures every sweep point (start-up / compile paid once)."""
    from bench.sweep import est_peak_mib

    base = cfg["sweep_base"]
    shapes = sorted({tuple({**base, ax: v}[k] for k in ("N", "d", "V")) for ax, vs in cfg["sweeps"].items() for v in vs},
                    key=lambda s: s[0] * s[1] * s[2])
    for dt in cfg["sweep_dtypes"]:
        elt = 4 if dt == "fp32" else 2
        results: dict = {}
        for m in ["gemm"] + [m for m in pool if m in passed.get(dt, [])]:
            ok = [s for s in shapes if est_peak_mib(m, *s, elt) <= budget]
            t0 = time.perf_counter()
            try:
                rs = run_worker("bench.sweep", ["--method", m, "--dtype", dt, "--repeats",
                                                str(cfg["gemm_repeats"] if m == "gemm" else cfg["repeats"]),
                                                "--points", ",".join(f"{N}:{d}:{V}" for N, d, V in ok)])["points"]
            except Exception as e:
                rs = [{"method": m, "dtype": dt, "N": N, "d": d, "V": V, "error": str(e)[-800:]} for N, d, V in ok]
            _log(f"  {dt} {m:14s} {len(ok)} points in one process: {time.perf_counter() - t0:.0f} s")
            for r in rs:
                results[(r["N"], r["d"], r["V"], m)] = r
            for s in shapes:
                if s not in ok:
                    results[(*s, m)] = {"method": m, "dtype": dt, "N": s[0], "d": s[1], "V": s[2],
                                        "skipped": f"estimated peak {est_peak_mib(m, *s, elt):.0f} MiB > budget"}
        for N, d, V in shapes:
            if (N, d, V, dt) in cache:
                continue
            gemm = results.get((N, d, V, "gemm"), {})
            rows = {}
            for m in [m for m in pool if m in passed.get(dt, [])]:
                r = results.get((N, d, V, m), {"error": "missing"})
                if "median_s" in r and "floor_s" in gemm:
                    r["x_floor"] = r["median_s"] / gemm["floor_s"]
                rows[m] = r
            cache[(N, d, V, dt)] = {"N": N, "d": d, "V": V, "dtype": dt, "gemm": gemm, "methods": rows}
            _print_point(cache[(N, d, V, dt)])


def _print_point(pt) -> None:
    N, d, V, dt = pt["N"], pt["d"], pt["V"], pt["dtype"]
    for m, r in pt["methods"].items():
        if "median_s" in r:
            _log(f"  {dt} N={N:<6d} d={d:<5d} V={V:<7d} {m:14s} {r['median_s']*1e3:9.1f} ms "
                 f"(spread {r['spread']*100:4.1f}%)  peak +{r['peak_extra_mib']:8.1f} MiB  {r['gflops']:7.1f} GFLOP/s"
                 + (f"  {r['x_floor']:.2f}x floor" if "x_floor" in r else ""))
        else:
            _log(f"  {dt} N={N:<6d} d={d:<5d} V={V:<7d} {m:14s} {r.get('skipped') or 'ERROR ' + r.get('error', '')[-200:]}")
    g = pt.get("gemm", {})
    if "floor_s" in g:
        _log(f"  {dt} N={N:<6d} d={d:<5d} V={V:<7d} {'6NdV floor':14s} {g['floor_s']*1e3:9.1f} ms  "
             f"(GEMM {g['gemm_gflops']:.1f} GFLOP/s)")


def stage_step(quick: bool, out_dir: Path) -> dict:
    path = ROOT / "bench" / "step.py"
    if not path.exists():
        return {"skipped": "bench/step.py not present (the trainer's step benchmark has not landed)"}
    helptext = subprocess.run([sys.executable, "-m", "bench.step", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300).stdout
    args = []
    if quick and "--quick" in helptext:
        args.append("--quick")
    # its own folder: bench/step.py's committed results in bench/results must not be overwritten by the suite;
    # the suite JSON embeds the step result
    step_dir = Path(tempfile.mkdtemp(prefix="suite-step-"))
    if "--out" in helptext:
        args += ["--out", str(step_dir)]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "bench.step", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600)
    res = {"command": "python -m bench.step " + " ".join(args), "returncode": proc.returncode,
           "stdout_tail": proc.stdout[-3000:], "seconds": time.time() - t0}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-3000:]
    fresh = [p for p in step_dir.glob("step*.json") if p.stat().st_mtime >= t0 - 1]
    if fresh:
        newest = max(fresh, key=lambda p: p.stat().st_mtime)
        res["json_path"] = str(newest)
        res["result"] = json.loads(newest.read_text())
    return res


def stage_plan(cfg: dict, out_dir: Path) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "bench.plan_validate", *cfg["plan_args"], "--out", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    _log(proc.stdout[-4000:])
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "command": " ".join(cmd[1:])}
    fresh = [p for p in out_dir.glob("plan_validate*.json") if p.stat().st_mtime >= t0 - 1]
    if not fresh:
        return {"error": "plan_validate wrote no JSON"}
    return json.loads(max(fresh, key=lambda p: p.stat().st_mtime).read_text())


# ------------------------------------------------------------------------------------------------------------
def latest_result(out_dir: Path) -> Path | None:
    cands = [p for p in out_dir.glob("*.json") if _is_suite_json(p)]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def _is_suite_json(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("benchmark") == "suite"
    except Exception:
        return False


def report(path: Path, out_dir: Path) -> list[Path]:
    from bench.plots import make_plots, readme_section

    data = json.loads(path.read_text())
    pngs = make_plots(data, out_dir, stem=path.stem)
    md = readme_section(data, path, pngs, out_dir)
    md_path = out_dir / "README_section.md"
    md_path.write_text(md)
    _log(f"wrote {md_path}")
    for p in pngs:
        _log(f"wrote {p}")
    return [md_path, *pngs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweeps (< 10 min on a 2-core CPU)")
    p.add_argument("--report", action="store_true",
                   help="regenerate plots + README section from the newest suite JSON (or --from) and exit")
    p.add_argument("--from", dest="from_json", default=None, help="with --report: the suite JSON to report")
    p.add_argument("--stages", default="check,headline,sweeps,step,plan")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--mem-frac", type=float, default=0.5, help="skip points estimated above this share of free RAM")
    args = p.parse_args(argv)
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        path = Path(args.from_json) if args.from_json else latest_result(out_dir)
        if path is None:
            _log(f"no suite JSON under {out_dir}: run `python -m bench.suite --quick` first")
            return 1
        report(path, out_dir)
        return 0

    import torch

    gpu = torch.cuda.is_available()
    cfg = config(args.quick, gpu)
    stages = set(args.stages.split(","))
    budget = mem_available_mib() * args.mem_frac
    t_start = time.time()
    argv_str = " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"benchmark": "suite", "command": f"python -m bench.suite {argv_str}".strip(),
               "machine": {**machine_info(), "machine_tag": machine_tag(), "git": _git_rev(), "versions": _versions(),
                           "mem_budget_mib": budget},
               "quick": args.quick, "config": cfg, "targets_max": TARGETS}
    _log(f"machine: {payload['machine']['cpu']} x{payload['machine']['cores']}"
         f"{' + ' + payload['machine'].get('gpu', '') if gpu else ''}; memory budget {budget:.0f} MiB")
    cache: dict = {}
    passed = {"fp32": list(GPU_ALL if gpu else CPU_FULL), "bf16": list(GPU_ALL if gpu else CPU_FULL)}
    if "check" in stages:
        _log("\n[check] every method vs the fp64 oracle")
        payload["check"] = stage_check(cfg, gpu)
        passed = payload["check"]["passed"]
        payload["not_timed"] = {dt: sorted(set(GPU_ALL if gpu else CPU_FULL + CPU_TINY) - set(passed[dt])) for dt in passed}
    if "headline" in stages:
        payload["headline"], _ = stage_timing(cfg, passed, gpu, budget, cache)
    if "sweeps" in stages:
        payload["sweeps"] = stage_sweeps(cfg, passed, gpu, budget, cache)
    if "step" in stages:
        _log("\n[step]")
        payload["step"] = stage_step(args.quick, out_dir)
        _log(json.dumps({k: v for k, v in payload["step"].items() if k not in ("result", "stdout_tail")})[:600])
    if "plan" in stages:
        _log("\n[plan] planner vs measured peak memory")
        payload["plan"] = stage_plan(cfg, out_dir)
    payload["seconds"] = time.time() - t_start
    day = _dt.date.today().isoformat()
    path = out_dir / f"{machine_tag()}-{day}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    _log(f"\nwrote {path} ({payload['seconds'] / 60:.1f} min)")
    for h in payload.get("headline", []):
        t = h.get("targets", {})
        _log(f"targets {h['dtype']}: " + ", ".join(
            f"{k} {t[k]:.2f} ({'met' if t['met'][k] else 'NOT met'}, <= {TARGETS[k]})" for k in TARGETS if k in t))
    report(path, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
