"""A run folder belongs to one run (issue 13): lock, run id, refusal / --overwrite, --resume rules, verified
checkpoints with fallback, no unpickling of checkpoint bytes, inputs never written.

Every run here is a 2-layer d=32 Llama for 4 steps in this process (about a second each); the oracle for "the
resumed / fallback / overwritten run is right" is an uninterrupted run of the same config in a clean folder:
the exported weights must be bit-identical."""
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, base_overrides

STEPS = 4


def _ov(corpus, out, **kw):
    extra = {"max_steps": STEPS, "checkpoint.every": 2, "checkpoint.keep": 0, "checkpoint.final": True,
             "checkpoint.export_hf": True, "optim.schedule": "cosine", "loss.objective": "npo", "loss.beta": 0.5}
    extra.update(kw)
    return base_overrides(corpus, str(out), **extra)


def _cfg(corpus, out, **kw):
    from simnpo_fast.train import load_config

    return load_config(None, _ov(corpus, out, **kw))


def _weights(out):
    return load_file(os.path.join(str(out), "hf", "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4) kept pristine; tests copy it."""
    from simnpo_fast.train import train

    out = tmp_path_factory.mktemp("straight") / "run"
    res = train(_cfg(corpus, out))
    assert res.steps == STEPS
    return {"out": out, "weights": _weights(out), "run_id": res.run_id,
            "losses": [r["loss"] for r in res.records]}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ============================================================================ one run per folder

def test_every_checkpoint_records_the_run_id(straight):
    from simnpo_fast.train.checkpoint import list_checkpoints

    run = json.load(open(straight["out"] / "run.json"))
    assert run["run_id"] == straight["run_id"] and len(run["run_id"]) == 32
    cks = list_checkpoints(str(straight["out"] / "checkpoints"))
    assert [s for s, _ in cks] == [2, 4]
    for _, p in cks:
        assert json.load(open(os.path.join(p, "trainer_state.json")))["run_id"] == straight["run_id"]
        man = json.load(open(os.path.join(p, "MANIFEST.json")))
        assert man["run_id"] == straight["run_id"]
        listed = set(man["files"])
        assert listed == set(os.listdir(p)) - {"MANIFEST.json", "COMPLETE"}  # every file, nothing else
        for name, e in man["files"].items():  # sizes and hashes recomputed independently
            data = open(os.path.join(p, name), "rb").read()
            assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    assert not os.path.exists(straight["out"] / "run.lock")  # released at the end


def test_fresh_run_over_another_runs_checkpoints_is_refused_then_overwrite_moves_it_aside(corpus, straight, tmp_path):
    """Issue item 1: a rerun with another lr into a folder with checkpoints must never hand back the old model."""
    from simnpo_fast.errors import RunFolderError
    from simnpo_fast.train import train

    out = _copy(straight["out"], tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(RunFolderError, match=r"holds 2 checkpoint\(s\) of run .*--resume.*--overwrite"):
        train(_cfg(corpus, out, **{"optim.lr": 5e-3}))
    assert _snapshot(out) == before  # refused before anything was written

    res = train(_cfg(corpus, out, **{"optim.lr": 5e-3}), overwrite=True)
    assert res.run_id != straight["run_id"]
    moved = [os.path.join(out, "replaced", d) for d in os.listdir(out / "replaced")]
    assert len(moved) == 1 and moved[0].endswith(straight["run_id"][:12])
    # the old run is intact in replaced/ (same bytes as before), nothing deleted
    old = {k[len(os.path.relpath(moved[0], out)) + 1:]: v for k, v in _snapshot(out).items()
           if k.startswith("replaced/")}
    assert old == {k: v for k, v in before.items() if k != "run.lock"}
    # the exported model is the new run's: identical to a clean run with lr 5e-3, not the old lr-1e-3 model
    clean = train(_cfg(corpus, tmp_path / "clean", **{"optim.lr": 5e-3}))
    _assert_same_weights(_weights(out), _weights(tmp_path / "clean"))
    assert [r["loss"] for r in res.records] == [r["loss"] for r in clean.records]
    assert json.load(open(out / "run.json"))["run_id"] == res.run_id


def test_resume_with_nothing_to_resume_says_so_and_auto_starts_fresh(corpus, tmp_path):
    from simnpo_fast.errors import RunFolderError
    from simnpo_fast.train import train

    out = tmp_path / "run"
    os.makedirs(out)
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # a killed run's log, no checkpoint
    with pytest.raises(RunFolderError, match=r"nothing to resume in .*checkpoints.*--resume=auto"):
        train(_cfg(corpus, out, **{"checkpoint.resume": True}))
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'  # untouched
    res = train(_cfg(corpus, out, **{"checkpoint.resume": "auto", "max_steps": 2}))
    assert [r["step"] for r in res.records] == [1, 2]
    (old,) = os.listdir(out / "replaced")  # the killed run's log was moved aside, not overwritten
    assert (out / "replaced" / old / "log.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    assert [json.loads(x)["step"] for x in open(out / "log.jsonl")] == [1, 2]


def test_a_fresh_run_never_leaves_an_earlier_runs_model_next_to_its_own_config(corpus, tmp_path):
    """A run that keeps no checkpoint, rerun with another lr and killed before its export: the folder must not
    hold the first run's model next to the second run's config (it is in replaced/)."""
    from simnpo_fast.train import train

    out = tmp_path / "run"
    nock = {"checkpoint.every": 0, "checkpoint.final": False}
    first = train(_cfg(corpus, out, **nock))
    w1 = _weights(out)

    def crash(run, step):
        raise KeyboardInterrupt  # stands for a kill after step 1

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(corpus, out, **nock, **{"optim.lr": 5e-3}), hooks={"after_step": crash})
    assert not (out / "hf").exists()
    assert json.load(open(out / "run.json"))["config"]["optim"]["lr"] == 5e-3
    (old,) = os.listdir(out / "replaced")
    assert old.endswith(first.run_id[:12])
    _assert_same_weights(load_file(str(out / "replaced" / old / "hf" / "model.safetensors")), w1)
    assert not os.path.exists(out / "run.lock")  # released on the way out


def test_resume_refuses_a_changed_config_and_names_the_keys(corpus, straight, tmp_path):
    """Issue item 3: optim.lr=1e9 --resume used to train at the old lr and record 1e9."""
    from simnpo_fast.errors import RunFolderError
    from simnpo_fast.train import train

    out = _copy(straight["out"], tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(RunFolderError, match=r"2 key\(s\): loss\.beta: 0\.5 -> 0\.7; optim\.lr: 0\.001 -> 1000000000\.0\."):
        train(_cfg(corpus, out, **{"checkpoint.resume": True, "optim.lr": 1e9, "loss.beta": 0.7}))
    assert _snapshot(out) == before
    # allowed: the step budget, logging and checkpoint cadence -> continues from step 4 to 6
    res = train(_cfg(corpus, out, **{"checkpoint.resume": True, "max_steps": 6, "log_every": 2,
                                     "checkpoint.every": 3}))
    assert [r["step"] for r in res.records] == [5, 6] and res.run_id == straight["run_id"]


def test_finished_finetune_stage_with_another_config_is_not_reused(corpus, tmp_path):
    from simnpo_fast.errors import RunFolderError
    from simnpo_fast.train.run_folder import write_run_file
    from simnpo_fast.train import config_to_dict, finetune_config, train

    cfg = _cfg(corpus, tmp_path / "run", **{"finetune.enabled": True, "finetune.lr": 1e-2})
    ft = finetune_config(cfg)
    os.makedirs(os.path.join(ft.output_dir, "hf"))
    open(os.path.join(ft.output_dir, "hf", "config.json"), "w").write("{}")
    old = config_to_dict(ft)
    old["optim"]["lr"] = 3e-3
    write_run_file(ft.output_dir, "0" * 32, old)
    with pytest.raises(RunFolderError, match=r"another finetune config \(optim\.lr: 0\.003 -> 0\.01\)"):
        train(cfg)


# ============================================================================ lock

def test_lock_live_stale_and_foreign(tmp_path, capfd):
    from simnpo_fast.errors import RunFolderError
    from simnpo_fast.train.run_lock import RunLock, read_lock

    folder = str(tmp_path / "f")
    a = RunLock(folder).acquire()
    info = read_lock(a.path)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()} on host"):
        RunLock(folder).acquire()
    a.release()
    assert not os.path.exists(a.path)

    def write(**kw):
        with open(a.path, "w") as f:
            json.dump(dict({"pid": os.getpid(), "host": socket.gethostname(), "start_time": None}, **kw), f)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write(pid=dead.pid)  # a killed run on this host: stale, taken over
    b = RunLock(folder).acquire()
    assert read_lock(b.path)["token"] == b.token
    b.release()
    write(start_time="1")  # our pid, but another process start time: a reused pid, stale
    RunLock(folder).acquire().release()
    for damaged in ({"pid": "abc"}, {"pid": -1}, {"pid": 0}, {"pid": True}, {"pid": 1.5}, {"host": None}):
        write(**damaged)  # names no process (kill(-1 or 0, 0) would probe a process group): stale, taken over
        RunLock(folder).acquire().release()
        assert "lock file is damaged" in capfd.readouterr().err
    write(host="another-host-0")  # cannot be checked from here: never taken over, the message says what to do
    with pytest.raises(RunFolderError, match=r"another-host-0.*If that run is dead, delete .*run\.lock"):
        RunLock(folder).acquire()


# ============================================================================ verified checkpoints

def _flip_byte(path, offset_from_end=100):
    data = bytearray(open(path, "rb").read())
    data[len(data) - offset_from_end] ^= 0x01
    open(path, "wb").write(bytes(data))


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def _shard(ck):
    return next(os.path.join(ck, f) for f in os.listdir(ck) if f.endswith(".distcp"))


CORRUPTIONS = {
    "truncated shard": (lambda ck: _truncate(_shard(ck)), "__0_0.distcp has"),
    "zero-size shard": (lambda ck: _truncate(_shard(ck), 0.0), "__0_0.distcp has 0 bytes"),
    "bit-flipped shard": (lambda ck: _flip_byte(_shard(ck)), "checksum mismatch in __0_0.distcp"),
    "missing .metadata": (lambda ck: os.remove(os.path.join(ck, ".metadata")), ".metadata is missing"),
    "truncated .metadata": (lambda ck: _truncate(os.path.join(ck, ".metadata")), ".metadata has"),
    "bad trainer_state.json": (lambda ck: open(os.path.join(ck, "trainer_state.json"), "w").write("{"),
                               "trainer_state.json has"),
    "truncated rng file": (lambda ck: _truncate(os.path.join(ck, "rng_rank0.pt")), "rng_rank0.pt has"),
    "manifest edited": (lambda ck: open(os.path.join(ck, "MANIFEST.json"), "a").write(" "),
                        "MANIFEST.json does not match"),
    "marker of an older version": (lambda ck: open(os.path.join(ck, "COMPLETE"), "w").write("4"),
                                   "COMPLETE is not a manifest marker"),
    "marker missing": (lambda ck: os.remove(os.path.join(ck, "COMPLETE")), "the COMPLETE marker is missing"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_verified_one(corpus, straight, tmp_path, capfd, case):
    """Issue item 5: each damage is reported by name, the checkpoint is moved aside (not deleted), the run
    resumes from step 2 and ends bit-identical to the uninterrupted run."""
    from simnpo_fast.train import train

    out = _copy(straight["out"], tmp_path / "run")
    shutil.rmtree(out / "hf")
    damage, reason = CORRUPTIONS[case]
    damage(str(out / "checkpoints" / "step_00000004"))
    res = train(_cfg(corpus, out, **{"checkpoint.resume": True}))
    err = capfd.readouterr().err
    assert f"step_00000004 failed verification: {reason}" in err.replace(str(out / "checkpoints") + "/", ""), err
    assert "trying the previous one" in err and "resuming run" in err and "step_00000002" in err
    assert [r["step"] for r in res.records] == [3, 4]
    assert [r["loss"] for r in res.records] == straight["losses"][2:]
    _assert_same_weights(_weights(out), straight["weights"])
    rejected = out / "checkpoints" / "step_00000004.rejected"
    assert rejected.is_dir() and reason.split()[0] in (rejected / "REJECTED").read_text()
    assert res.checkpoint.endswith("step_00000004")  # rewritten by this run, verified below
    from simnpo_fast.train.checkpoint import verify_checkpoint

    assert verify_checkpoint(res.checkpoint, run_id=straight["run_id"]).ok


def test_no_verified_checkpoint_is_a_checkpoint_error(corpus, straight, tmp_path):
    from simnpo_fast.errors import CheckpointError
    from simnpo_fast.train import train

    out = _copy(straight["out"], tmp_path / "run")
    for s in ("step_00000002", "step_00000004"):
        _flip_byte(_shard(str(out / "checkpoints" / s)))
    with pytest.raises(CheckpointError, match=r"no checkpoint passes verification: step_00000004: checksum mismatch"
                                              r".*step_00000002: checksum mismatch"):
        train(_cfg(corpus, out, **{"checkpoint.resume": True}))
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]  # left as found


def test_last_good_checkpoint_is_the_verified_one(corpus, straight, tmp_path):
    """Issue item 5: a bit-flipped newest checkpoint must not be named "last good checkpoint" later."""
    from simnpo_fast.errors import NonFiniteError
    from simnpo_fast.train import train

    out = _copy(straight["out"], tmp_path / "run")
    _flip_byte(_shard(str(out / "checkpoints" / "step_00000004")))

    def poison(run, step):
        next(p for p in run.model.parameters() if p.grad is not None).grad.fill_(float("nan"))

    with pytest.raises(NonFiniteError, match=r"step 3: non-finite gradient.*Last good checkpoint: .*step_00000002$"):
        train(_cfg(corpus, out, **{"checkpoint.resume": True}), hooks={"after_backward": poison})


class _Evil:
    def __reduce__(self):
        return (open, (os.environ["SIMNPO_EVIL_MARK"], "w"))


def test_crafted_metadata_is_never_unpickled(corpus, straight, tmp_path, monkeypatch, capfd):
    """Issue item 4: a .metadata whose pickle calls a function (with a manifest rewritten to match, as an
    attacker with write access would) is refused by the reader before the call; the run falls back."""
    from simnpo_fast.train.checkpoint import MANIFEST, MARKER, read_dcp_metadata
    from simnpo_fast.train import train

    mark = tmp_path / "code-ran"
    monkeypatch.setenv("SIMNPO_EVIL_MARK", str(mark))
    out = _copy(straight["out"], tmp_path / "run")
    ck = out / "checkpoints" / "step_00000004"
    (ck / ".metadata").write_bytes(pickle.dumps(_Evil()))
    man = json.loads((ck / MANIFEST).read_text())
    data = (ck / ".metadata").read_bytes()
    man["files"][".metadata"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mbytes = json.dumps(man).encode()
    (ck / MANIFEST).write_bytes(mbytes)
    (ck / MARKER).write_text(json.dumps({"step": 4, "manifest_sha256": hashlib.sha256(mbytes).hexdigest()}))

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle (io|builtins)\.open"):
        read_dcp_metadata(str(ck))
    res = train(_cfg(corpus, out, **{"checkpoint.resume": True}))
    assert "refusing to unpickle" in capfd.readouterr().err
    assert not mark.exists()  # the payload never ran
    assert [r["step"] for r in res.records] == [3, 4]
    _assert_same_weights(_weights(out), straight["weights"])


def test_dcp_non_tensor_entries_are_read_weights_only(tmp_path, monkeypatch):
    """The second pickle in DCP's reader (optimizer hyper-parameters, torch.load(weights_only=False) upstream)."""
    import io

    from simnpo_fast.train.checkpoint import SafeLoadPlanner

    mark = tmp_path / "code-ran"
    monkeypatch.setenv("SIMNPO_EVIL_MARK", str(mark))
    buf = io.BytesIO()
    torch.save(_Evil(), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, buf)
    assert not mark.exists()


# ============================================================================ inputs are never written

def _hf_model_folder(corpus, path, with_tokenizer=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    from simnpo_fast.data import load_tokenizer

    tok = load_tokenizer(corpus["tokenizer"])
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    m.save_pretrained(str(path))
    if with_tokenizer:
        tok.save_pretrained(str(path))
    return str(path)


def test_model_folder_is_never_written(corpus, tmp_path):
    """Issue item 6: a tokenizer used to be trained *into* model.path when it had none."""
    from simnpo_fast.errors import TokenizerError
    from simnpo_fast.train import train

    bare = _hf_model_folder(corpus, tmp_path / "bare", with_tokenizer=False)
    snap = _snapshot(bare)
    with pytest.raises(TokenizerError, match=r"bare: no tokenizer files"):
        train(_cfg(corpus, tmp_path / "r1", **{"model.path": bare, "data.tokenizer": None, "max_steps": 1}))
    assert _snapshot(bare) == snap

    full = _hf_model_folder(corpus, tmp_path / "full")
    snap = _snapshot(full)
    res = train(_cfg(corpus, tmp_path / "r2", **{"model.path": full, "data.tokenizer": None, "max_steps": 2}))
    assert res.steps == 2 and _snapshot(full) == snap


@pytest.mark.parametrize("where", ["output inside the model", "model inside the output's hf"])
def test_outputs_never_overlap_inputs(corpus, tmp_path, where):
    from simnpo_fast.errors import ConfigError

    if where == "output inside the model":
        model = _hf_model_folder(corpus, tmp_path / "m")
        out = os.path.join(model, "run")
    else:
        out = str(tmp_path / "o")
        model = _hf_model_folder(corpus, tmp_path / "o" / "hf")  # e.g. a previous run's export, reused in place
    with pytest.raises(ConfigError, match="inside"):
        _cfg(corpus, out, **{"model.path": model, "data.tokenizer": None})


def test_overwrite_refuses_before_moving_a_folder_that_holds_an_input(corpus, tmp_path):
    """Issue 24 item 4: model.path inside <output_dir>/finetune (an earlier run's finetuned model): --overwrite
    would move it aside, so it stops before anything moves."""
    from simnpo_fast.errors import ConfigError
    from simnpo_fast.train import train

    out = tmp_path / "run"
    model = _hf_model_folder(corpus, out / "finetune" / "hf")
    (out / "run.json").write_text(json.dumps({"run_id": "earlier", "config": {}}))
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"model.path .*finetune/hf.* lies inside .*finetune.*--overwrite"):
        train(_cfg(corpus, out, **{"model.path": str(model), "data.tokenizer": None}), overwrite=True)
    assert _snapshot(out) == before and not (out / "replaced").exists()


def test_synthetic_corpus_is_never_generated_over_other_files(corpus, tmp_path):
    from simnpo_fast.errors import ConfigError
    from simnpo_fast.train import train

    data = tmp_path / "mydata"
    os.makedirs(data)
    (data / "forget10.json").write_text('{"question": "q", "answer": "a"}\n')
    snap = _snapshot(data)
    with pytest.raises(ConfigError, match=r"mydata.*not a generated corpus.*data\.kind=tofu"):
        train(_cfg(corpus, tmp_path / "run", **{"data.path": str(data)}))
    assert _snapshot(data) == snap
    with pytest.raises(ConfigError, match=r"other parameters \(n_authors: 10 in the folder, 12 asked"):
        train(_cfg(corpus, tmp_path / "run2", **{"data.synthetic": "{n_authors: 12, facts_per_author: 5}"}))


# ============================================================================ CLI: exit codes, one line

def test_cli_refusal_and_nothing_to_resume_exit_7_one_line(corpus, straight, tmp_path, capsys):
    """(The same through a real subprocess, with no traceback: the concurrent case of test_trainer_resume.)"""
    from simnpo_fast.cli import main

    out = _copy(straight["out"], tmp_path / "run")
    cases = ((["unlearn", *_ov(corpus, out)], "holds 2 checkpoint(s)"),
             (["unlearn", "--resume", *_ov(corpus, tmp_path / "empty")], "nothing to resume"),
             (["unlearn", "--resume=auto", "--overwrite", *_ov(corpus, tmp_path / "x")], None))
    for argv, what in cases:
        code = main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        if what is None:  # contradictory flags: a config error
            assert code == 2 and "cannot be combined with --resume" in lines[0], lines
        else:
            assert code == 7 and lines[0].startswith("simnpo-fast: run folder: ") and what in lines[0], lines


def test_two_ranks_refuse_together_and_resume_from_a_verified_checkpoint(corpus, tmp_path):
    """The lock, the decision and its errors live on rank 0 and reach every rank; the checkpoint hashes are split
    over the ranks (the damaged shard is rank 1's share)."""
    from .conftest import torchrun

    torchrun(2, os.path.join(ROOT, "tests", "trainer", "resume_worker.py"), str(tmp_path),
             json.dumps([o for o in _ov(corpus, "unused", micro_batch_size=2) if not o.startswith("output_dir=")]))
    r0 = json.load(open(tmp_path / "report.json"))
    r1 = json.load(open(tmp_path / "report_rank1.json"))
    for r in (r0, r1):
        assert r["first"] == [1, 2, 3, 4] and r["resumed"] == [3, 4]
        assert r["refused"] and "holds 2 checkpoint(s)" in r["refused"]
    assert r0["equal"] and r0["rejected"]


@pytest.mark.parametrize("spelling", ["trailing slash", "relative", "through a symlink"])
def test_resume_takes_another_spelling_of_the_same_data_folder(corpus, straight, tmp_path, monkeypatch, spelling):
    """Issue 24 item 6: paths are compared as folders, not as strings."""
    from simnpo_fast.train import train

    out = _copy(straight["out"], tmp_path / "run")
    shutil.rmtree(out / "hf")
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    monkeypatch.chdir(tmp_path)
    os.symlink(corpus["data"], tmp_path / "data-link")
    data = {"trailing slash": corpus["data"] + "/", "relative": os.path.relpath(corpus["data"], tmp_path),
            "through a symlink": "data-link"}[spelling]
    res = train(_cfg(corpus, out, **{"checkpoint.resume": True, "data.path": data}))
    assert [r["step"] for r in res.records] == [3, 4]
    _assert_same_weights(_weights(out), straight["weights"])


@pytest.mark.parametrize("bad", ["model", "data"])
def test_a_run_that_fails_before_its_first_step_leaves_no_run_behind(corpus, tmp_path, bad):
    """Issue 24 item 7: a model or data error found while setting the run up must not leave run.json behind,
    or the corrected rerun would move that never-run 'run' into replaced/."""
    from simnpo_fast.errors import SimnpoError
    from simnpo_fast.data import DataError
    from simnpo_fast.train import train

    out = tmp_path / "run"
    if bad == "model":
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "big"}))
        kw = {"model.path": str(model), "model.preset": "null", "model.config": "{}"}
    else:
        data = tmp_path / "data"
        shutil.copytree(corpus["data"], data)
        (data / "forget10.json").write_text('{"question": "q"}\n')  # the default forget split, no answer
        kw = {"data.path": str(data)}
    with pytest.raises((SimnpoError, DataError)):
        train(_cfg(corpus, out, **kw))
    assert not (out / "run.json").exists() and not (out / "run.lock").exists()
    res = train(_cfg(corpus, out, max_steps=1))
    assert res.steps == 1 and not (out / "replaced").exists()
    assert json.loads((out / "run.json").read_text())["run_id"] == res.run_id
