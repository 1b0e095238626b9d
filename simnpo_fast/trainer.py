"""The FSDP2 trainer's public names; the code lives in :mod:`simnpo_fast.train` (one module per job).

    cfg = load_config("default", ["optim.lr=1e-4"])
    result = train(cfg)            # same code from 1 CPU process to torchrun --nnodes N --nproc_per_node G
"""
from .likelihood import mean_loglik, sequence_logps  # noqa: F401
from .train import *  # noqa: F401,F403
from .train import __all__ as _train_all

__all__ = list(_train_all) + ["mean_loglik", "sequence_logps"]
