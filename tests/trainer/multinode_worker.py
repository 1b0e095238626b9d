"""torchrun worker of test_multinode: one run of the trainer; rank 0 writes its per-step records and the full
gradients of its first step (every rank joins the gathers).

    torchrun --nnodes 2 --node-rank 0|1 --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \
        tests/trainer/multinode_worker.py OUT_FILE JSON_OVERRIDES
"""
import json
import os
import sys

import torch


def main():
    out_file, overrides = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    from simnpo_fast.distributed import full_tensor
    from simnpo_fast.train import load_config, train

    grads = {}

    def after_backward(run, step):
        if not grads:  # the first step of this run
            for n, p in run.model.named_parameters():
                if p.grad is not None:
                    grads[n] = full_tensor(p.grad).detach().clone()  # collective

    res = train(load_config(None, overrides), hooks={"after_backward": after_backward})
    if int(os.environ["RANK"]) == 0:
        torch.save({"records": res.records, "grads": grads, "world_size": int(os.environ["WORLD_SIZE"])},
                   out_file)


if __name__ == "__main__":
    from simnpo_fast.distributed import owned_process_group

    with owned_process_group():
        main()
