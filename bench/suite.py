"""The benchmark suite: every method side by side, scaling sweeps, GEMM floor, end-to-end step, planner check.

    python -m bench.suite --quick            # < 10 min on a 2-core CPU: JSON + PNG plots + README section
    python -m bench.suite                    # full sweeps (long)
    python -m bench.suite --report           # only regenerate plots + README section from the newest JSON
    simnpo-fast bench [--quick] [--report]   # the same, from anywhere inside a source checkout

Stages (``--stages`` picks a subset; each measurement is a fresh subprocess of ``bench.sweep``):
  check     every method of bench/methods.py vs the fp64 oracle on the loss, d hidden and d weight, in fp32 and
            bf16: at a tiny shape (all methods; the Triton ones -- ours and Liger's FLCE -- under
            TRITON_INTERPRET=1 on CPU) and at a bench-sized shape (the methods timed at full size). A method
            that fails is reported with its errors and never timed.
  headline  N=2048 tokens, d=512, V=32000, fp32 and bf16: median time, spread, peak memory, GFLOP/s and x the
            6NdV floor at the GEMM rate measured in the same run; target ratios (``TARGETS``). Each method's
            peak memory comes from one call in an exact-RSS worker, its times from another worker under the
            default allocator (``_measure``).
  sweeps    time and peak memory vs N, vs V and vs d (fp32; + bf16 in full mode); points whose estimated peak
            exceeds ``--mem-frac`` of the free memory are skipped and listed. Full mode: a fresh process per
            (method, point); quick mode: one fresh process per method measures all its points (start-up /
            compile paid once).
  scaling   time and peak memory vs N = 2048 .. 16384 at V=128256 (Llama-3), d=512, fp32, one timed call per
            point; not in the default stages (~20 min on 2 cores): ``--stages scaling``.
  step      python -m bench.step (the trainer's end-to-end step), its JSON embedded under ``step.result``.
  plan      python -m bench.plan_validate: planner prediction vs measured peak of small Llama models.
Output: bench/results/<machine>-<date>[-quick].json, PNG plots next to it, bench/results/README_section.md
(``bench.report``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import (RESULTS, machine_info, machine_tag, mem_available_mib, run_script, run_worker,
                           write_result)
from bench.methods import METHOD_NAMES, OURS, TRITON, full_size_names
from bench.report import latest_result, report
from bench.sweep import est_peak_mib

#: upper bounds of the ratios ``targets`` reports for our method (time and memory vs naive, time vs the GEMM
#: floor, time vs the fastest peer)
#: (issue 26: <= 1.10x the floor and <= 1.0x the fastest peer in fp32 and bf16, memory <= 15% of naive)
TARGETS = {"time_vs_naive": 0.9, "memory_vs_naive": 0.15, "time_vs_floor": 1.10, "time_vs_best_peer": 1.0}


#: the scaling stage: Llama-3's vocabulary, N up to 16384 tokens, one timed call per point (the first, whose
#: peak memory is measured); methods whose estimated peak exceeds the budget are marked, not run
#: (``max_call_s``: a method whose time, extrapolated linearly in N from its previous point, exceeds it is not run
#: at the larger points: the stage stays within ~20 min on 2 cores)
SCALING = {"N": [2048, 4096, 8192, 16384], "d": 512, "V": 128256, "dtypes": ["fp32"], "repeats": 1,
           "max_call_s": 90.0}


def config(quick: bool, gpu: bool) -> dict:
    if quick:
        return {
            "repeats": 5, "gemm_repeats": 3,
            "check_tiny": {"N": 64, "d": 48, "V": 300, "seq_len": 16},
            "check_mid": {"N": 512, "d": 128, "V": 4096, "seq_len": 128},
            "headline": {"N": 2048, "d": 512, "V": 32000, "dtypes": ["fp32", "bf16"]},
            "sweep_base": {"N": 512, "d": 256, "V": 8192},
            "sweeps": {"N": [512, 2048, 4096], "V": [8192, 32768, 65536], "d": [128, 256, 512]},
            "shared_process": True,  # one process per (method, dtype) for all sweep points
            "sweep_dtypes": ["fp32"],
            "scaling": SCALING,
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
        "scaling": SCALING,
        "plan_args": [],
    }


def _log(msg: str) -> None:
    print(msg, flush=True)


def _pool(gpu: bool) -> tuple:
    return full_size_names("cuda" if gpu else "cpu")


# ------------------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------------------
def _log_check(label: str, run: dict) -> None:
    for m, res in run["results"].items():
        err = res.get("error")
        desc = (f"ERROR {err[:100]}" if err else
                f"loss {res['loss']:.1e} dh {res['dhidden']:.1e} dW {res['dweight']:.1e} (max); "
                f"dh {res['dhidden_norm']:.1e} dW {res['dweight_norm']:.1e} (norm); tol {res['tol']:.0e} "
                f"on {res.get('criterion')}")
        _log(f"  check {label:4s} {run['dtype']} {m:14s} {'ok  ' if res['ok'] else 'FAIL'} {desc}")
    for m, note in run.get("unavailable", {}).items():
        _log(f"  check {label:4s} {run['dtype']} {m:14s} n/a  {note}")


def stage_check(cfg: dict, gpu: bool) -> dict:
    """Correctness of every method vs the fp64 oracle; returns {"runs": [...], "passed": {dtype: [methods]}}."""
    full = _pool(gpu)
    plans = [("tiny", cfg["check_tiny"], full, None), ("mid", cfg["check_mid"], full, None)]
    if not gpu:
        plans.insert(1, ("tiny", cfg["check_tiny"], TRITON, {"TRITON_INTERPRET": "1"}))
    runs = []
    for label, shape, methods, env in plans:
        t0 = time.perf_counter()
        shape_args = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
        try:
            rs = run_worker("bench.sweep", ["--check", "--dtype", "fp32,bf16", "--methods", ",".join(methods),
                                            *shape_args], env=env)["checks"]
        except Exception as e:  # the whole worker failed: every method in it fails
            rs = [{"dtype": dt, **shape, "results": {m: {"ok": False, "error": str(e)[-500:]} for m in methods},
                   "unavailable": {}} for dt in ("fp32", "bf16")]
        for r in rs:
            r.update(stage=label, interpreter=bool(env), seconds=(time.perf_counter() - t0) / len(rs))
            runs.append(r)
            _log_check(label, r)
    passed = {}
    for dt in ("fp32", "bf16"):
        status: dict[str, bool] = {}
        for r in (r for r in runs if r["dtype"] == dt):
            for m, res in r["results"].items():
                status[m] = status.get(m, True) and bool(res.get("ok"))
        passed[dt] = sorted(m for m, ok in status.items() if ok)
    return {"runs": runs, "passed": passed}


# ------------------------------------------------------------------------------------------------------------
# timing: headline and sweeps
# ------------------------------------------------------------------------------------------------------------
def _skipped(method: str, N: int, d: int, V: int, dt: str, budget: float) -> dict | None:
    est = est_peak_mib(method, N, d, V, 4 if dt == "fp32" else 2)
    if est <= budget:
        return None
    return {"method": method, "dtype": dt, "N": N, "d": d, "V": V,
            "skipped": f"estimated peak {est:.0f} MiB > budget {budget:.0f} MiB"}


#: the fields of a result that come from the timing worker (the rest from the memory worker)
TIME_FIELDS = ("median_s", "min_s", "max_s", "n", "spread", "times_s", "gflops", "threads")


def _measure(method: str, N: int, d: int, V: int, dt: str, repeats: int, budget: float, split: bool = True) -> dict:
    """One method (or the GEMM floor) at one point, each in fresh processes: peak memory from one call under the
    exact-RSS allocator, times from ``repeats`` calls (after an untimed one) under the default allocator, as
    programs run (exact-RSS mode page-faults every large allocation afresh: ``bench/harness/measure.py``).
    ``split=False``: one exact-RSS worker gives both (its ``repeats`` calls timed, the first with the memory)."""
    skipped = _skipped(method, N, d, V, dt, budget)
    if skipped:
        return skipped
    args = ["--method", method, "--dtype", dt, "--N", str(N), "--d", str(d), "--V", str(V)]
    try:
        if method == "gemm":
            return run_worker("bench.sweep", args + ["--repeats", str(repeats)], exact_rss=False)
        mem = run_worker("bench.sweep", args + ["--repeats", "1" if split else str(repeats)])
        if not split:
            return mem
        timed = run_worker("bench.sweep", args + ["--repeats", str(repeats), "--what", "time"], exact_rss=False)
    except Exception as e:
        return {"method": method, "dtype": dt, "N": N, "d": d, "V": V, "error": str(e)[-800:]}
    return dict(mem, memory_call_s=mem["median_s"], **{k: timed[k] for k in TIME_FIELDS if k in timed})


def _assemble(N: int, d: int, V: int, dt: str, gemm: dict, rows: dict) -> dict:
    """One point of the results: the GEMM floor and every method, each with its ``x_floor``."""
    for r in rows.values():
        if "median_s" in r and "floor_s" in gemm:
            r["x_floor"] = r["median_s"] / gemm["floor_s"]
    pt = {"N": N, "d": d, "V": V, "dtype": dt, "gemm": gemm, "methods": rows}
    _print_point(pt)
    return pt


def _point(methods, N, d, V, dt, cfg, budget, cache: dict) -> dict:
    """GEMM floor + every method at one point, each in its own worker (cached: sweeps share their base point)."""
    key = (N, d, V, dt)
    if key not in cache:
        gemm = _measure("gemm", N, d, V, dt, cfg["gemm_repeats"], budget)
        rows = {m: _measure(m, N, d, V, dt, cfg["repeats"], budget, cfg.get("split_time", True)) for m in methods}
        cache[key] = _assemble(N, d, V, dt, gemm, rows)
    return cache[key]


def _print_point(pt) -> None:
    where = f"  {pt['dtype']} N={pt['N']:<6d} d={pt['d']:<5d} V={pt['V']:<7d}"
    for m, r in pt["methods"].items():
        if "median_s" in r:
            _log(f"{where} {m:14s} {r['median_s']*1e3:9.1f} ms (spread {r['spread']*100:4.1f}%)  "
                 f"peak +{r['peak_extra_mib']:8.1f} MiB  {r['gflops']:7.1f} GFLOP/s"
                 + (f"  {r['x_floor']:.2f}x floor" if "x_floor" in r else ""))
        else:
            _log(f"{where} {m:14s} {r.get('skipped') or 'ERROR ' + r.get('error', '')[-200:]}")
    g = pt.get("gemm", {})
    if "floor_s" in g:
        _log(f"{where} {'6NdV floor':14s} {g['floor_s']*1e3:9.1f} ms  (GEMM {g['gemm_gflops']:.1f} GFLOP/s)")


def targets(point: dict, ours: str) -> dict:
    """The target ratios for ``ours`` at one point (absent where a side is missing) and which are ``met``."""
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
    peers = {m: r["median_s"] for m, r in ms.items() if r.get("median_s") and m not in OURS}
    if peers:
        best = min(peers, key=peers.get)
        out["best_peer"] = best
        out["time_vs_best_peer"] = o["median_s"] / peers[best]
        out["time_vs_peers"] = {m: o["median_s"] / t for m, t in peers.items()}
    out["met"] = {k: out[k] <= v for k, v in TARGETS.items() if k in out}
    return out


def stage_headline(cfg: dict, passed: dict, gpu: bool, budget: float, cache: dict) -> list:
    head, headline = cfg["headline"], []
    for dt in head["dtypes"]:
        methods = [m for m in _pool(gpu) if m in passed.get(dt, [])]
        _log(f"\n[headline] {dt}: {', '.join(methods)}")
        pt = _point(methods, head["N"], head["d"], head["V"], dt, cfg, budget, cache)
        pt["targets"] = targets(pt, "triton" if gpu else "chunked")
        headline.append(pt)
    return headline


def _shape(point: dict) -> tuple:
    return point["N"], point["d"], point["V"]


def _shared_process_points(cfg, methods, dt, budget, cache) -> None:
    """Quick mode: one process per method measures every sweep point (start-up / compile paid once)."""
    base = cfg["sweep_base"]
    shapes = sorted({_shape({**base, ax: v}) for ax, vs in cfg["sweeps"].items() for v in vs},
                    key=lambda s: s[0] * s[1] * s[2])
    results: dict = {}
    for m in ["gemm", *methods]:
        fits = [s for s in shapes if not _skipped(m, *s, dt, budget)]
        t0 = time.perf_counter()
        try:
            rs = run_worker("bench.sweep", ["--method", m, "--dtype", dt, "--repeats",
                                            str(cfg["gemm_repeats"] if m == "gemm" else cfg["repeats"]),
                                            "--points", ",".join(f"{N}:{d}:{V}" for N, d, V in fits)])["points"]
        except Exception as e:
            rs = [{"method": m, "dtype": dt, "N": N, "d": d, "V": V, "error": str(e)[-800:]} for N, d, V in fits]
        _log(f"  {dt} {m:14s} {len(fits)} points in one process: {time.perf_counter() - t0:.0f} s")
        results.update({(r["N"], r["d"], r["V"], m): r for r in rs})
        results.update({(*s, m): _skipped(m, *s, dt, budget) for s in shapes if s not in fits})
    for N, d, V in shapes:
        if (N, d, V, dt) not in cache:
            rows = {m: results.get((N, d, V, m), {"error": "missing"}) for m in methods}
            cache[(N, d, V, dt)] = _assemble(N, d, V, dt, results.get((N, d, V, "gemm"), {}), rows)


def stage_sweeps(cfg: dict, passed: dict, gpu: bool, budget: float, cache: dict) -> list:
    base, out = cfg["sweep_base"], []
    for dt in cfg["sweep_dtypes"]:
        methods = [m for m in _pool(gpu) if m in passed.get(dt, [])]
        if cfg.get("shared_process"):
            _shared_process_points(cfg, methods, dt, budget, cache)
        for axis, values in cfg["sweeps"].items():
            _log(f"\n[sweep {axis}] {dt} (base N={base['N']} d={base['d']} V={base['V']})")
            pts = [_point(methods, *_shape({**base, axis: v}), dt, cfg, budget, cache) for v in values]
            out.append({"axis": axis, "dtype": dt, "base": base, "points": pts})
    return out


def stage_scaling(cfg: dict, passed: dict, gpu: bool, budget: float, cache: dict) -> list:
    """Time and peak memory vs N at Llama-3's vocabulary (``SCALING``): ours should stay flat in memory beyond
    the gradients and linear in time; points a method cannot hold are listed as skipped (estimated peak)."""
    sc, out = cfg["scaling"], []
    run_cfg = dict(cfg, repeats=sc["repeats"], gemm_repeats=sc["repeats"], split_time=False)
    for dt in sc["dtypes"]:
        methods = [m for m in _pool(gpu) if m in passed.get(dt, [])]
        _log(f"\n[scaling] {dt} d={sc['d']} V={sc['V']}: {', '.join(methods)}")
        pts, slow = [], {}
        for i, N in enumerate(sc["N"]):
            pt = _point([m for m in methods if m not in slow], N, sc["d"], sc["V"], dt, run_cfg, budget, cache)
            pt["methods"].update({m: {"method": m, "dtype": dt, "N": N, "d": sc["d"], "V": sc["V"], "skipped": why}
                                  for m, why in slow.items()})
            nxt = sc["N"][i + 1] if i + 1 < len(sc["N"]) else N
            for m, r in pt["methods"].items():
                if m not in slow and r.get("median_s", 0.0) * nxt / N > sc["max_call_s"]:
                    slow[m] = f"time: {r['median_s']:.0f} s at N={N}, over {sc['max_call_s']:.0f} s at N={nxt}"
            pts.append(pt)
        out.append({"axis": "N", "dtype": dt, "base": {"d": sc["d"], "V": sc["V"]}, "points": pts})
    return out


# ------------------------------------------------------------------------------------------------------------
# whole benchmarks: step and plan
# ------------------------------------------------------------------------------------------------------------
def stage_step() -> dict:
    """``python -m bench.step`` into a temporary folder (the committed step results are not touched)."""
    record, result = run_script("bench.step", [], Path(tempfile.mkdtemp(prefix="suite-step-")))
    return dict(record, result=result) if result else record


def stage_plan(cfg: dict, out_dir: Path) -> dict:
    record, result = run_script("bench.plan_validate", cfg["plan_args"], out_dir)
    _log(record["stdout_tail"][-4000:])
    if record["returncode"] != 0:
        return {"error": record.get("stderr_tail", ""), "command": record["command"]}
    return result or {"error": "plan_validate wrote no JSON"}


# ------------------------------------------------------------------------------------------------------------
def run_stages(args, stages: set, out_dir: Path, gpu: bool, budget: float) -> dict:
    cfg = config(args.quick, gpu)
    out: dict = {"quick": args.quick, "config": cfg, "targets_max": TARGETS}
    cache: dict = {}
    passed = {"fp32": list(_pool(gpu)), "bf16": list(_pool(gpu))}
    if "check" in stages:
        _log("\n[check] every method vs the fp64 oracle")
        out["check"] = stage_check(cfg, gpu)
        passed = out["check"]["passed"]
        every = METHOD_NAMES if gpu else _pool(gpu) + TRITON
        out["not_timed"] = {dt: sorted(set(every) - set(passed[dt])) for dt in passed}
    if "headline" in stages:
        out["headline"] = stage_headline(cfg, passed, gpu, budget, cache)
    if "sweeps" in stages:
        out["sweeps"] = stage_sweeps(cfg, passed, gpu, budget, cache)
    if "scaling" in stages:
        out["scaling"] = stage_scaling(cfg, passed, gpu, budget, cache)
    if "step" in stages:
        _log("\n[step]")
        out["step"] = stage_step()
        _log(json.dumps({k: v for k, v in out["step"].items() if k not in ("result", "stdout_tail")})[:600])
    if "plan" in stages:
        _log("\n[plan] planner vs measured peak memory")
        out["plan"] = stage_plan(cfg, out_dir)
    return out


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
    budget = mem_available_mib() * args.mem_frac
    t_start = time.time()
    argv_str = " ".join(argv if argv is not None else sys.argv[1:])
    machine = {**machine_info(), "machine_tag": machine_tag(), "mem_budget_mib": budget}
    _log(f"machine: {machine['cpu']} x{machine['cores']}{' + ' + machine.get('gpu', '') if gpu else ''}; "
         f"memory budget {budget:.0f} MiB")
    payload = {"benchmark": "suite", "command": f"python -m bench.suite {argv_str}".strip(), "machine": machine,
               **run_stages(args, set(args.stages.split(",")), out_dir, gpu, budget)}
    payload["seconds"] = time.time() - t_start
    path = write_result("", payload, out_dir, suffix="-quick" if args.quick else "")
    _log(f"\nwrote {path} ({payload['seconds'] / 60:.1f} min)")
    for h in payload.get("headline", []):
        t = h.get("targets", {})
        _log(f"targets {h['dtype']}: " + ", ".join(
            f"{k} {t[k]:.2f} ({'met' if t['met'][k] else 'NOT met'}, <= {TARGETS[k]})" for k in TARGETS if k in t))
    report(path, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
