"""torchrun worker of test_trainer_fsdp: one optimizer step per case, dumps the full gradients (rank 0).

    torchrun --nproc_per_node 2 tests/trainer/dist_worker.py OUT_DIR JSON_CASES
"""
import json
import os
import sys

import torch


def main():
    out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    from simnpo_fast.distributed import full_tensor
    from simnpo_fast.train import load_config, train

    for name, overrides in cases.items():
        cfg = load_config(None, overrides)
        grads = {}

        def after_backward(run, step):
            for n, p in run.model.named_parameters():
                if p.grad is not None:
                    g = full_tensor(p.grad)  # collective
                    grads[n] = g.detach().clone()

        res = train(cfg, hooks={"after_backward": after_backward})
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save({"grads": grads, "loss": res.records[0]["loss"]}, os.path.join(out_dir, f"{name}.pt"))


if __name__ == "__main__":
    from simnpo_fast.distributed import owned_process_group

    with owned_process_group():  # barrier + destroy_process_group before the interpreter exits
        main()
