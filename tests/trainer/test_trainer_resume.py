"""Acceptance: SIGKILL a run after step k, resume, and the weights after step n equal an uninterrupted run.
Also: a non-finite gradient stops the run and keeps the last good checkpoint; config errors fail fast."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, base_overrides, child_env

STEPS = 6


def _overrides(corpus, out, **kw):
    # 2 accumulation micro-batches per step and a cosine schedule: the resume must restore the sampler
    # position, the ForgetRetainDataset pairing epoch, the optimizer moments and the scheduler
    extra = {"max_steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "checkpoint.every": 2,
             "checkpoint.final": True, "checkpoint.export_hf": True, "optim.schedule": "cosine",
             "optim.warmup_steps": 1, "loss.objective": "npo", "loss.beta": 0.5}
    extra.update(kw)
    return base_overrides(corpus, out, **extra)


def test_sigkill_then_resume_equals_uninterrupted(corpus, tmp_path):
    from simnpo_fast.train.checkpoint import latest_checkpoint
    from simnpo_fast.train import load_config, train

    out = str(tmp_path / "killed")
    cfg_default = os.path.join(ROOT, "simnpo_fast", "configs", "default.yaml")
    cmd = [sys.executable, os.path.join(ROOT, "tests", "trainer", "stall_worker.py"), "unlearn", "--config",
           cfg_default, *_overrides(corpus, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(child_env(2), SIMNPO_TEST_STALL_AFTER="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 150
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "STALLED after step 3" in line:
                break
            assert time.time() < deadline, "".join(lines[-30:])
        else:
            pytest.fail("run ended before stalling:\n" + "".join(lines[-40:]))
        # a second run into the same folder while the first lives: refused before any work, exit 7
        second = subprocess.run([sys.executable, "-m", "simnpo_fast.cli", "unlearn", "--config", cfg_default,
                                 *_overrides(corpus, out), "--resume=auto"], cwd=ROOT, env=child_env(1),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 7, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "in use by another run" in err[0] and f"pid {proc.pid}" in err[0], err
        assert "Traceback" not in second.stderr
        os.kill(proc.pid, signal.SIGKILL)  # step 3 is done but not checkpointed: it must be redone
    finally:
        proc.kill()
        proc.wait()
    with open(os.path.join(out, "run.lock")) as f:
        assert json.load(f)["pid"] == proc.pid  # the killed run's lock is left behind: stale, taken over below
    ck = os.path.join(out, "checkpoints")
    assert os.path.basename(latest_checkpoint(ck)) == "step_00000002"
    assert not os.path.exists(os.path.join(out, "hf"))
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3]
    # a checkpoint torn by a crash mid-save must be ignored
    os.makedirs(os.path.join(ck, "step_00000004.tmp"))
    open(os.path.join(ck, "step_00000004.tmp", "junk"), "w").close()

    resumed = train(load_config(cfg_default, _overrides(corpus, out, **{"checkpoint.resume": True})))
    assert resumed.steps == STEPS and [r["step"] for r in resumed.records] == [3, 4, 5, 6]
    straight = train(load_config(cfg_default, _overrides(corpus, str(tmp_path / "straight"))))
    assert straight.steps == STEPS

    a = load_file(os.path.join(out, "hf", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "straight", "hf", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume: {(a[k] - b[k]).abs().max()}"
    # the run really trained (weights moved) and the log has each step once
    assert any(r["grad_norm"] > 0 for r in straight.records)
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [json.loads(x)["step"] for x in f]
    assert steps == list(range(1, STEPS + 1))
    la = [r["loss"] for r in resumed.records]
    lb = [r["loss"] for r in straight.records[2:]]
    assert la == lb
    assert not os.path.exists(os.path.join(ck, "step_00000004.tmp"))
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released at the end of the resumed run


def test_non_finite_gradient_stops_and_keeps_last_checkpoint(corpus, tmp_path):
    from simnpo_fast.train.checkpoint import latest_checkpoint, list_checkpoints
    from simnpo_fast.train import NonFiniteError, load_config, train

    out = str(tmp_path / "nan")
    cfg = load_config(None, base_overrides(corpus, out, max_steps=5, **{"checkpoint.every": 2,
                                                                      "checkpoint.final": True,
                                                                      "checkpoint.export_hf": True}))

    def poison(run, step):
        if step == 3:
            p = next(p for p in run.model.parameters() if p.grad is not None)
            p.grad.fill_(float("nan"))

    with pytest.raises(NonFiniteError, match=r"non-finite gradient.*step_00000002"):
        train(cfg, hooks={"after_backward": poison})
    ck = os.path.join(out, "checkpoints")
    assert [s for s, _ in list_checkpoints(ck)] == [2]
    assert latest_checkpoint(ck).endswith("step_00000002")
    assert not os.path.exists(os.path.join(out, "hf"))  # no export of a broken model
    # the kept checkpoint is good: resuming from it (without the poison) finishes with finite weights
    cfg.checkpoint.resume = True
    res = train(cfg)
    assert res.steps == 5
    w = load_file(os.path.join(out, "hf", "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())


ERRORS = [
    ("loss.objective=simpo", "unknown objective"),
    ("loss.beta=-4.5", "beta must be > 0"),
    ("data.kind=tofu", "data.path"),
    ("data.path=/nonexistent/tofu", "does not exist"),
    ("model.path=/nonexistent/model", "not a local folder"),
    ("optim.lrr=1e-5", "unknown config key"),
    ("batch_size=7", "multiple of micro_batch_size"),
]


@pytest.mark.parametrize("override, match", ERRORS)
def test_config_errors_raise_on_load(override, match):
    from simnpo_fast.train import load_config

    extra = ["data.kind=tofu"] if override.startswith("data.path") else []
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_config("default", ["output_dir=/tmp/never", *extra, override])


def test_cli_config_error_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "simnpo_fast.cli", "unlearn", "--config", "default",
           f"output_dir={out}", "loss.beta=-1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error" in proc.stderr and "beta must be > 0" in proc.stderr
    assert not out.exists()  # nothing generated, trained or written


def test_packaged_configs_load(tmp_path):
    from simnpo_fast.train import load_config

    with pytest.raises(ValueError, match="data.path is required"):
        load_config("tofu_forget10")  # the model / data paths must be given: nothing is downloaded
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    paths = [f"model.path={tmp_path / 'm'}", f"data.path={tmp_path / 'd'}"]
    tofu = load_config("tofu_forget10", paths)
    assert (tofu.loss.objective, tofu.loss.beta, tofu.loss.forget_weight, tofu.loss.retain_weight,
            tofu.loss.gamma, tofu.optim.lr, tofu.max_steps, tofu.batch_size) == ("simnpo", 4.5, 0.125, 1.0, 0.0,
                                                                                 1e-5, 125, 32)
    # the authors' schedule (issue 23): warm-up from 0 over one epoch's steps, no clipping, per-row retain means
    assert (tofu.optim.warmup_steps, tofu.optim.warmup_from_zero, tofu.optim.max_grad_norm, tofu.loss.normalize,
            tofu.data.pairing, tofu.data.max_length, tofu.seed, tofu.optim.weight_decay_rule) == \
        (12, True, 0.0, "sequence", "seeded_offset", 500, 1001, "hf")
    for split, steps, warm, beta in (("forget05", 62, 6, 2.5), ("forget01", 12, 1, 2.5)):
        c = load_config(f"tofu_{split}", paths)
        assert (c.max_steps, c.optim.warmup_steps, c.loss.beta, c.data.retain_split) == \
            (steps, warm, beta, "retain" + str(100 - int(split[-2:])))
    for corpus, beta, gamma in (("news", 0.75, 3.0), ("books", 0.7, 0.0)):
        muse = load_config(f"muse_{corpus}", paths)
        assert muse.data.kind == "muse" and (muse.loss.objective, muse.loss.beta, muse.loss.gamma) == \
            ("simnpo", beta, gamma) and muse.optim.schedule == "constant" and muse.optim.weight_decay == 0.0
    d = load_config("default", ["optim.lr=2e-4", "loss.beta=3"])
    assert d.optim.lr == 2e-4 and d.loss.beta == 3.0 and d.finetune.enabled


def _stalled_run(cmd, env, want: int, deadline_s: float = 150):
    """Start ``cmd``; return ``(proc, {rank: pid})`` once ``want`` ranks print their STALLED line."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, lines = time.time() + deadline_s, []
    for line in proc.stdout:
        lines.append(line)  # the ranks share the pipe: their lines may interleave, so parse the whole text
        pids = {int(r): int(p) for r, p in re.findall(r"STALLED after step \d+ rank (\d+) pid (\d+)", "".join(lines))}
        if len(pids) == want:
            return proc, pids, lines
        if time.time() > deadline:
            break
    proc.kill()
    pytest.fail("run ended or hung before stalling:\n" + "".join(lines[-40:]))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_then_resume_equals_uninterrupted(corpus, tmp_path, sig):
    """SIGTERM (SLURM / Kubernetes preemption) or SIGUSR1 (SLURM --signal) after step 3 of 6, with checkpoints
    every 4 steps: the run checkpoints step 3, exits 10 with one line, and the resumed run's model equals an
    uninterrupted run's bit for bit."""
    from simnpo_fast.train.checkpoint import latest_checkpoint, verify_checkpoint
    from simnpo_fast.train import load_config, train

    out = str(tmp_path / "preempted")
    cfg_default = os.path.join(ROOT, "simnpo_fast", "configs", "default.yaml")
    ov = _overrides(corpus, out, **{"checkpoint.every": 4})
    cmd = [sys.executable, os.path.join(ROOT, "tests", "trainer", "stall_worker.py"), "unlearn", "--config",
           cfg_default, *ov]
    env = dict(child_env(2), SIMNPO_TEST_STALL_AFTER="3", SIMNPO_TEST_STALL_UNTIL_SIGNAL="1")
    proc, pids, lines = _stalled_run(cmd, env, want=1)
    try:
        os.kill(proc.pid, sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 10, "".join(lines[-20:]) + rest
    err = [x for x in rest.splitlines() if x.startswith("simnpo-fast")]
    assert len(err) == 1 and "preempted" in err[0] and sig.name in err[0] and "--resume" in err[0], rest
    assert "Traceback" not in rest
    ck = latest_checkpoint(os.path.join(out, "checkpoints"))
    assert os.path.basename(ck) == "step_00000003" and verify_checkpoint(ck).ok
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released on the way out
    resumed = train(load_config(cfg_default, ov + ["checkpoint.resume=auto"]))
    assert [r["step"] for r in resumed.records] == [4, 5, 6]
    straight = train(load_config(cfg_default, _overrides(corpus, str(tmp_path / "straight"),
                                                         **{"checkpoint.every": 4})))
    a = load_file(os.path.join(out, "hf", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "straight", "hf", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in straight.records[3:]]


def test_preemption_of_one_rank_stops_every_rank_at_the_same_step(corpus, tmp_path):
    """torchrun, 2 ranks: SIGTERM reaches rank 1 only (rank 0 goes on after a pause); both ranks stop after the
    same step with one checkpoint of it and exit 10; a 2-rank resume ends with the uninterrupted 2-rank model."""
    from simnpo_fast.train.checkpoint import latest_checkpoint, verify_checkpoint

    from .conftest import free_port

    cfg_default = os.path.join(ROOT, "simnpo_fast", "configs", "default.yaml")

    def cmd(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                os.path.join(ROOT, "tests", "trainer", "stall_worker.py"), "unlearn", "--config", cfg_default,
                *_overrides(corpus, out, **{"checkpoint.every": 4}), *extra]

    out = str(tmp_path / "preempted")
    env = dict(child_env(1), SIMNPO_TEST_STALL_AFTER="3", SIMNPO_TEST_STALL_UNTIL_SIGNAL="1",
               SIMNPO_TEST_STALL_SECONDS="2")
    proc, pids, lines = _stalled_run(cmd(out), env, want=2)
    try:
        os.kill(pids[1], signal.SIGTERM)
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode != 0
    assert text.count("preempted: SIGTERM received: stopped after step 3") == 1, text[-3000:]  # rank 1
    assert "preempted: a signal on another rank received: stopped after step 3" in text, text[-3000:]  # rank 0
    ck = latest_checkpoint(os.path.join(out, "checkpoints"))
    assert os.path.basename(ck) == "step_00000003" and verify_checkpoint(ck).ok
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3]
    env.pop("SIMNPO_TEST_STALL_AFTER")
    env["SIMNPO_TEST_STALL_AFTER"] = "0"
    for folder, extra in ((out, ["--resume"]), (str(tmp_path / "straight"), [])):
        done = subprocess.run(cmd(folder, *extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    a = load_file(os.path.join(out, "hf", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "straight", "hf", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
