"""torchrun worker of test_run_folder (2 ranks): a run with checkpoints at steps 2 and 4; one shard of step 4
damaged; a fresh run into the folder (refused on every rank); ``--resume`` (falls back to step 2, verified with
the hashing split over both ranks) and ends with the first run's weights. Rank 0 writes ``report.json``.

    torchrun --nproc_per_node 2 tests/trainer/resume_worker.py OUT_DIR JSON_OVERRIDES
"""
import json
import os
import sys

import torch


def main():
    out_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from simnpo_fast.distributed import barrier
    from simnpo_fast.errors import RunFolderError
    from simnpo_fast.train import load_config, train

    rank = int(os.environ["RANK"])
    run = os.path.join(out_dir, "run")
    ov = overrides + [f"output_dir={run}"]
    first = train(load_config(None, ov))
    report = {"first": [r["step"] for r in first.records]}
    hf = os.path.join(run, "hf", "model.safetensors")
    barrier()
    if rank == 0:
        weights = load_file(hf)
        shard = os.path.join(run, "checkpoints", "step_00000004", "__0_0.distcp")  # hashed by rank 1
        data = bytearray(open(shard, "rb").read())
        data[-100] ^= 1
        open(shard, "wb").write(bytes(data))
        os.remove(hf)
    barrier()
    try:
        train(load_config(None, ov))
        report["refused"] = None
    except RunFolderError as e:  # the same class on every rank
        report["refused"] = str(e)
    res = train(load_config(None, ov + ["checkpoint.resume=true"]))
    report["resumed"] = [r["step"] for r in res.records]
    if rank == 0:
        again = load_file(hf)
        report["equal"] = weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
        report["rejected"] = os.path.isdir(os.path.join(run, "checkpoints", "step_00000004.rejected"))
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f)
    else:
        with open(os.path.join(out_dir, "report_rank1.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    from simnpo_fast.distributed import owned_process_group

    with owned_process_group():
        main()
