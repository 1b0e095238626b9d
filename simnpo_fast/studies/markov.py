"""``simnpo-fast study markov``: the SimNPO paper's mixture-of-Markov-chains study (models, training and
measurements in :mod:`simnpo_fast.markov`): seeds x settings x methods, model checkpoints, worker processes, results.

Stages: (1) per seed, the retrained (retain-only) model and one pretrained model per setting, trained once and
kept in ``<out>/models`` under a name that hashes everything they depend on (a changed config trains new
ones, nothing is overwritten); (2) per (seed, setting), every method unlearns a copy of the pretrained model
on the same batch schedule, with the KLs and weights recorded along the way. Both stages are lists of
independent jobs, run in ``workers`` spawned processes (1 torch thread each) or in this process. The timing
records the wall time, the load average and the CPU time of the jobs (on a shared machine the wall time grows
with the load; the CPU time divided by the worker count estimates the wall time on idle cores).

    simnpo-fast study markov [--quick]                  # configs/study_markov.yaml (--quick: its quick section)
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ..errors import ConfigError
from ..markov.chains import CHAINS, make_chain, transition_chi2
from ..markov.core import (EvalSet, TrueChain, UnlearnData, build_model, cache_ref_logp, evaluate, make_evalset,
                           make_schedule, pretrain, unlearn)
from ..methods import get_method
from ..train.run_log import load_average, machine_info

DEFAULT_NAME = "markov"


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def chain_specs(cfg: dict, setting: str) -> Dict[str, dict]:
    """``{chain: {n, length}}`` of a setting (the ``data`` section with the setting's overrides)."""
    if setting not in cfg["settings"]:
        raise ConfigError(f"unknown setting {setting!r}; the config defines {sorted(cfg['settings'])}")
    d, s = cfg["data"], cfg["settings"][setting]
    sizes = {**d["sizes"], **s.get("sizes", {})}
    lengths = {**d["lengths"], **s.get("lengths", {})}
    return {c: {"n": int(sizes[c]), "length": int(lengths[c])} for c in CHAINS}


def _chain(cfg: dict, seed: int, name: str, spec: dict):
    d = cfg["data"]
    return make_chain(name, seed=seed, n=spec["n"], length=spec["length"], n_states=int(d["n_states"]),
                      leakage=float(d["leakage"]), test_frac=float(d["test_frac"]))


def model_job(cfg: dict, seed: int, chains: Dict[str, dict], out_dir: str) -> dict:
    """A model trained on the train splits of ``chains`` (the retrained model: retain only)."""
    d = cfg["data"]
    key = {"seed": seed, "chains": chains, "n_states": d["n_states"], "leakage": d["leakage"],
           "test_frac": d["test_frac"], "model": cfg["model"], "pretrain": cfg["pretrain"]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = "retrain" if list(chains) == ["retain"] else "pretrain-" + "-".join(chains)
    return {"cfg": cfg, "seed": seed, "chains": chains, "key": digest,
            "path": os.path.join(out_dir, "models", f"seed{seed}-{name}-{digest}.pt")}


def run_model_job(job: dict) -> dict:
    """Train (or find) the model of ``job``; returns its path, whether it was reused and its training stats."""
    cfg = job["cfg"]
    torch.set_num_threads(int(cfg.get("threads", 1)))
    if os.path.isfile(job["path"]):
        return {"path": job["path"], "reused": True, **torch.load(job["path"], weights_only=True)["stats"]}
    t0, c0 = time.perf_counter(), time.process_time()
    seqs = [s for c, spec in job["chains"].items() for s in _chain(cfg, job["seed"], c, spec).train]
    model = build_model(cfg["model"], int(cfg["data"]["n_states"]), job["seed"])
    p = cfg["pretrain"]
    stats = pretrain(model, seqs, epochs=int(p["epochs"]), batch_size=int(p["batch_size"]), lr=float(p["lr"]),
                     seed=job["seed"])
    stats["seconds"], stats["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    os.makedirs(os.path.dirname(job["path"]), exist_ok=True)
    tmp = job["path"] + f".tmp{os.getpid()}"
    torch.save({"state": model.state_dict(), "stats": stats}, tmp)
    os.replace(tmp, job["path"])
    return {"path": job["path"], "reused": False, **stats}


def load_model(cfg: dict, path: str, seed: int):
    model = build_model(cfg["model"], int(cfg["data"]["n_states"]), seed)
    model.load_state_dict(torch.load(path, weights_only=True)["state"])
    return model.eval()


def _checks(data: dict, sets: List[EvalSet]) -> dict:
    """Data and metric sanity of one (seed, setting): chi-square of each chain's sequences against its matrix,
    and the KL of each chain's own :class:`TrueChain` through the evaluation path (0 up to round-off)."""
    out = {}
    for c, s in zip(CHAINS, sets):
        seqs = np.concatenate([data[c].train, data[c].test])
        out[c] = {**transition_chi2(seqs, data[c].T),
                  "true_chain_kl": evaluate(TrueChain(data[c].T), [s])[c]["kl_true"]}
    return out


def run_setting_job(job: dict) -> dict:
    """Every method of one (seed, setting): trajectories, references and checks."""
    cfg, seed, setting = job["cfg"], job["seed"], job["setting"]
    torch.set_num_threads(int(cfg.get("threads", 1)))
    t0, c0 = time.perf_counter(), time.process_time()
    data = {c: _chain(cfg, seed, c, spec) for c, spec in chain_specs(cfg, setting).items()}
    pre, re = load_model(cfg, job["pretrained"], seed), load_model(cfg, job["retrained"], seed)
    n_eval = int(cfg["data"]["n_eval"])
    sets = [make_evalset(c, data[c].test[:n_eval], re, data[c].T) for c in CHAINS]
    ev_pre = evaluate(pre, sets)
    probe_ref = {c: ev_pre[c]["logp"] for c in ("forget1", "forget2")}
    u = cfg["unlearn"]
    forget = list(data["forget1"].train) + list(data["forget2"].train)
    retain = list(data["retain"].train)
    schedule = make_schedule(len(forget), len(retain), int(u["iterations"]), int(u["batch_size"]), seed)
    ref = cache_ref_logp(pre, forget, [i for fi, _ in schedule for i in fi])
    ud = UnlearnData(forget, retain, schedule, ref, float(np.mean([len(s) - 1 for s in forget])))
    histories = {}
    for m in job["methods"]:
        model = copy.deepcopy(pre)
        histories[m] = unlearn(model, cfg["methods"][m], ud, sets, probe_ref, lr=float(u["lr"]),
                               eval_every=int(u["eval_every"]), eval_dense=int(u.get("eval_dense", 0)))
    ev_re = evaluate(re, sets)
    return {"seed": seed, "setting": setting, "methods": histories,
            "retrained_kl_true": {c: ev_re[c]["kl_true"] for c in CHAINS},
            "checks": _checks(data, sets), "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def pool_map(fn, jobs: List[dict], workers: int) -> List[dict]:
    """``[fn(j) for j in jobs]``, in ``workers`` spawned processes when ``workers > 1``."""
    if workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        try:
            return [fn(j) for j in jobs]
        finally:  # the jobs set their own thread count: leave the caller's as it was
            torch.set_num_threads(threads)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, jobs))


def resolve(raw: dict, *, overrides: Optional[List[str]] = None, quick: bool = False,
            data: Optional[str] = None) -> dict:
    """The study config: ``quick`` merged over ``raw`` when asked, then the ``key=value`` overrides; validated.
    The study generates its own data: ``data`` (a data folder) is a ConfigError."""
    from ..train.config_io import apply_overrides

    if data:
        raise ConfigError("study markov generates its own data: --data does not apply")
    cfg = copy.deepcopy(raw)
    q = cfg.pop("quick", {})
    if quick:
        cfg = deep_merge(cfg, q)
    cfg = apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


REQUIRED = {"data": ("n_states", "leakage", "test_frac", "sizes", "lengths", "n_eval"), "model": (),
            "pretrain": ("epochs", "batch_size", "lr"), "unlearn": ("iterations", "batch_size", "lr", "eval_every"),
            "settings": (), "methods": ()}


def validate(cfg: dict) -> None:
    """Every key the study reads is there and every method / setting is one it can run (one-line errors)."""
    for sec, keys in REQUIRED.items():
        if not isinstance(cfg.get(sec), dict) or not cfg[sec]:
            raise ConfigError(f"study markov: section {sec!r} is missing or empty")
        for k in keys:
            if k not in cfg[sec]:
                raise ConfigError(f"study markov: {sec}.{k} is missing")
    for c in CHAINS:
        for k in ("sizes", "lengths"):
            if c not in cfg["data"][k]:
                raise ConfigError(f"study markov: data.{k}.{c} is missing")
    for m, spec in cfg["methods"].items():
        if not isinstance(spec, dict):
            raise ConfigError(f"methods.{m} must be a mapping with an objective, got {spec!r}")
        try:
            get_method(spec.get("objective"))
        except ValueError as e:
            raise ConfigError(f"methods.{m}.objective: {e}") from None
    for name, s in cfg["settings"].items():
        bad = [c for c in (s or {}).get("pretrain_on", []) if c not in CHAINS] if isinstance(s, dict) else [s]
        if not isinstance(s, dict) or not s.get("pretrain_on") or bad:
            raise ConfigError(f"settings.{name}.pretrain_on must list chains of {CHAINS}, got "
                              f"{s.get('pretrain_on') if isinstance(s, dict) else s!r}")


def default_results(out_dir: str, quick: bool = False) -> str:
    """``docs/results``; a ``quick`` run's go to ``<out_dir>/results``."""
    return os.path.join(out_dir, "results") if quick else os.path.join("docs", "results")


def run(cfg: dict, out_dir: str, *, seeds: Optional[List[int]] = None, methods: Optional[List[str]] = None,
               results_dir: Optional[str] = None, command: str = "") -> dict:
    """Run the study (stages in the module docstring); write ``<out>/study.json`` and, with ``results_dir``,
    the JSON, plots and Markdown there. Returns the study dict (``runs`` = one entry per seed and setting)."""
    from ..markov import study_report as report

    t0, load0 = time.perf_counter(), load_average()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    seeds = [int(s) for s in (seeds if seeds is not None else cfg["seeds"])]
    methods = list(methods or cfg["methods"])
    unknown = [m for m in methods if m not in cfg["methods"]]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; the config defines {sorted(cfg['methods'])}")
    workers = int(cfg.get("workers", 1))
    jobs, setting_jobs = {}, []
    for seed in seeds:
        re_job = model_job(cfg, seed, {"retain": chain_specs(cfg, next(iter(cfg["settings"])))["retain"]}, out_dir)
        for setting, s in cfg["settings"].items():
            specs = chain_specs(cfg, setting)
            if specs["retain"] != re_job["chains"]["retain"]:
                raise ConfigError(f"settings.{setting} changes the retain data: the retrained model is shared")
            pre_job = model_job(cfg, seed, {c: specs[c] for c in s["pretrain_on"]}, out_dir)
            jobs.setdefault(re_job["key"], re_job)
            jobs.setdefault(pre_job["key"], pre_job)
            setting_jobs.append({"cfg": cfg, "seed": seed, "setting": setting, "methods": methods,
                                 "pretrained": pre_job["path"], "retrained": re_job["path"]})
    model_stats = pool_map(run_model_job, list(jobs.values()), workers)
    t1 = time.perf_counter()
    runs = pool_map(run_setting_job, setting_jobs, workers)
    elapsed = time.perf_counter() - t0
    cpu = sum(m["cpu_s"] for m in model_stats if not m["reused"]) + sum(r["cpu_s"] for r in runs)
    study = {"name": cfg.get("name", "markov"), "command": command, "seeds": seeds, "methods": methods,
             "config": cfg, "runs": runs, "models": model_stats,
             "timing": {"date": date, "elapsed_s": elapsed, "models_s": t1 - t0, "unlearn_s": elapsed - (t1 - t0),
                        "jobs_cpu_s": cpu, "workers": workers, "loadavg_start": load0, "loadavg_end": load_average()},
             "machine": machine_info()}
    study["summary"] = report.summarize(study)
    report.save_json(study, os.path.join(out_dir, "study.json"))
    if results_dir:
        study["files"] = report.write_results(study, results_dir)
    return study


def summary_text(study: dict) -> str:
    """The report's text summary and where the results went."""
    from ..markov.study_report import text_summary

    return (f"{text_summary(study)}\n\nresults: {', '.join(study.get('files', {}).values())} "
            f"({study['timing']['elapsed_s'] / 60:.1f} min)")
