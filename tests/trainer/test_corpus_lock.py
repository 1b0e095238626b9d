"""Issue 24 item 10: runs that share a not-yet-generated synthetic corpus folder take turns: one generates it,
the others wait and reuse it, and the folder equals a corpus generated alone."""
import filecmp
import os
import subprocess
import sys

from .conftest import ROOT, child_env

PARAMS = {"n_authors": 6, "facts_per_author": 3, "seed": 1}
RACER = f"""
import sys, time
from simnpo_fast.train.datasets import synthetic_corpus
while time.time() < float(sys.argv[2]):
    pass
print("generated" if synthetic_corpus(sys.argv[1], {PARAMS!r}) else "reused", flush=True)
"""


def test_concurrent_runs_generate_a_shared_corpus_once(tmp_path):
    import time

    from simnpo_fast.data import synthetic

    shared = str(tmp_path / "shared" / "data")
    start = str(time.time() + 3.0)  # both processes imported, then released together
    procs = [subprocess.Popen([sys.executable, "-c", RACER, shared, start], cwd=ROOT, env=child_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert sorted(o.strip() for o, _ in outs) == ["generated", "reused", "reused"]
    alone = str(tmp_path / "alone")
    synthetic.generate(alone, **PARAMS)
    cmp = filecmp.dircmp(shared, alone)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, cmp.report()
    assert not [n for n in os.listdir(tmp_path / "shared") if ".tmp-" in n]  # no temporary folder left
