"""Checkpoint saves and loads that fail: every failure (a full or read-only disk, torch's own CheckpointException,
a checkpoint that no longer fits the model) ends the command with one line naming the folder and the cause and
exit status 8; nothing published is deleted (issue 24, items 2-3). Small file systems are real tmpfs mounts
(skipped where this process may not mount)."""
import contextlib
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, base_overrides, child_env
from .test_run_folder import _cfg, _ov, _shard

DEFAULT = os.path.join(ROOT, "simnpo_fast", "configs", "default.yaml")


@contextlib.contextmanager
def tmpfs(path, size: str, *options):
    os.makedirs(path, exist_ok=True)
    opts = ",".join((f"size={size}",) + options)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _cli(corpus, out, *extra, config=DEFAULT, **kw):
    ov = _ov(corpus, out, **kw)
    return subprocess.run([sys.executable, "-m", "simnpo_fast.cli", "unlearn", "--config", config, *ov, *extra],
                          cwd=ROOT, env=child_env(2), capture_output=True, text=True, timeout=300)


def _one_line(proc, code):
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errs = [x for x in lines if x.startswith("simnpo-fast: checkpoint error")]
    assert len(errs) == 1 and "Traceback" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr[-3000:]
    return errs[0]


def test_disk_full_during_a_checkpoint(corpus, tmp_path):
    """A 256 KiB file system: run.json and the log fit, the first checkpoint (~0.6 MB) does not."""
    with tmpfs(tmp_path / "small", "256k") as small:
        out = small / "run"
        proc = _cli(corpus, out)
        line = _one_line(proc, 8)
        assert "saving checkpoint" in line and str(out / "checkpoints" / "step_00000002") in line, line
        assert f"the file system of {out / 'checkpoints'} is full" in line, line
        assert not (out / "checkpoints" / "step_00000002.tmp").exists()  # the disk is given back
        assert (out / "run.json").is_file()


def test_read_only_checkpoint_folder(corpus, tmp_path):
    out = tmp_path / "run"
    with tmpfs(out / "checkpoints", "16m", "ro"):
        line = _one_line(_cli(corpus, out), 8)
    assert "saving checkpoint" in line and "Read-only file system" in line, line


def test_earlier_checkpoints_survive_a_failed_save(corpus, tmp_path):
    """Step 2 saved, then the disk fills (a file takes all but 200 KiB) before step 4: step 2 stays verified."""
    from simnpo_fast.train.checkpoint import verify_checkpoint

    with tmpfs(tmp_path / "small", "4m") as small:
        out = small / "run"
        from simnpo_fast.train import train

        def fill(run, step):
            if step == 2:
                free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
                with open(small / "filler", "wb") as f:
                    f.write(b"\0" * max(0, free - (200 << 10)))

        from simnpo_fast.errors import CheckpointError

        with pytest.raises(CheckpointError, match=r"saving checkpoint .*step_00000004 failed: .*is full"):
            train(_cfg(corpus, out), hooks={"after_step": fill})
        ck = out / "checkpoints" / "step_00000002"
        assert verify_checkpoint(str(ck)).ok and not (out / "checkpoints" / "step_00000004.tmp").exists()


def test_a_verified_checkpoint_that_does_not_fit_the_model(tmp_path):
    """torch's CheckpointException (a BaseException) on a size mismatch becomes a CheckpointError."""
    from simnpo_fast.errors import CheckpointError
    from simnpo_fast.train.checkpoint import load_checkpoint, save_checkpoint

    def model_and_opt(d):
        m = torch.nn.Linear(4, d)
        return m, torch.optim.AdamW(m.parameters())

    m, o = model_and_opt(4)
    m(torch.randn(2, 4)).sum().backward()
    o.step()
    ck = save_checkpoint(str(tmp_path / "ck"), 1, m, o, state={"step": 1})
    m2, o2 = model_and_opt(5)
    with pytest.raises(CheckpointError,
                       match=r"ck/step_00000001: cannot be loaded into this run's model.*Size mismatch"):
        load_checkpoint(ck, m2, o2)


def test_damaged_shard_with_a_recomputed_manifest(corpus, tmp_path):
    """The manifest verifies (its hashes were recomputed), DCP's reader fails: exit 8, one line."""
    from simnpo_fast.train import train

    out = tmp_path / "run"
    train(_cfg(corpus, out))  # in this test: a module-scoped run would leave its process group to later modules
    ck = out / "checkpoints" / "step_00000004"
    shard = _shard(str(ck))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    manifest = json.loads((ck / "MANIFEST.json").read_text())
    name = os.path.basename(shard)
    manifest["files"][name] = {"size": os.path.getsize(shard),
                               "sha256": hashlib.sha256(open(shard, "rb").read()).hexdigest()}
    mbytes = json.dumps(manifest, indent=1).encode()
    (ck / "MANIFEST.json").write_bytes(mbytes)
    (ck / "COMPLETE").write_text(json.dumps({"step": 4, "manifest_sha256": hashlib.sha256(mbytes).hexdigest()}))
    line = _one_line(_cli(corpus, out, "--resume", config=str(out / "config.yaml")), 8)
    assert str(ck) in line and "cannot be loaded" in line, line


def test_a_save_never_deletes_a_folder_without_its_marker(tmp_path, capfd):
    from simnpo_fast.train.checkpoint import save_checkpoint, verify_checkpoint

    m = torch.nn.Linear(3, 3)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    root = tmp_path / "ck"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "MANIFEST.json").write_text("{}")
    ck = save_checkpoint(str(root), 2, m, o, state={"step": 2})
    assert verify_checkpoint(ck).ok
    assert (root / "step_00000002.rejected" / "MANIFEST.json").read_text() == "{}"
    assert "had no COMPLETE marker: moved to" in capfd.readouterr().err
