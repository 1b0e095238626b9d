"""The FSDP2 training package: one module per job.

    from simnpo_fast.train import load_config, train
    result = train(load_config("default", ["optim.lr=1e-4"]))

==================  ===========================================================================================
``config``          the schema (typed sections, defaults), ``grad_accum``, ``finetune_config``
``validation``      the checks of ``TrainConfig.validate`` (one ConfigError naming the key)
``coerce``          strict YAML / override value coercion into the schema
``config_io``       packaged names and YAML files, ``key=value`` overrides, the resolved config as YAML
``datasets``        the run's tokenizer and encoded forget / retain datasets (synthetic corpus on demand)
``stream``          ``StepStream``: per optimizer step, this rank's ``ForgetRetainBatch`` micro-batches
``schedule``        the learning-rate schedule
``setup``           ``Run`` (a ``StepContext`` with the run's state) and ``setup``: process group, sharded model
                    (+ frozen reference), criterion, optimizer
``step``            ``StepContext`` and ``train_step``: one optimizer step in named pieces -> ``StepRecord``
``loop``            the loop of one stage: start / resume, steps, checkpoints, evaluation, export
``stages``          ``train``: the finetune stage, then the method, each through the same loop
``metrics``         JSONL log, progress bar, curves, peak memory
``preempt``         SIGTERM / SIGUSR1: a checkpoint at the next step boundary on every rank, then exit 10
``run_folder``      one run per output folder (``run_lock``: the lock)
``checkpoint``      verified distributed checkpoints and the HF export
==================  ===========================================================================================
"""
from ..errors import NonFiniteError
from .config import (FINETUNE_METHOD, CheckpointConfig, DataConfig, FinetuneConfig, LossConfig, OptimConfig,
                     ParallelConfig, TrainConfig, finetune_config, grad_accum)
from .config_io import (CONFIG_DIR, apply_overrides, config_path, config_to_dict, config_yaml, load_config,
                        read_config_file, save_config)
from .datasets import prepare_data
from .loop import TrainResult, run_loop
from .schedule import lr_lambda
from .setup import Run, setup
from .stages import RUN_ARTIFACTS, Stage, stages, train
from .step import StepContext, StepRecord, StepStats, train_step
from .stream import StepStream

__all__ = [
    "apply_overrides", "CheckpointConfig", "CONFIG_DIR", "config_path", "config_to_dict", "config_yaml",
    "DataConfig", "finetune_config", "FINETUNE_METHOD", "FinetuneConfig", "grad_accum", "load_config", "LossConfig",
    "lr_lambda", "NonFiniteError", "OptimConfig", "ParallelConfig", "prepare_data", "read_config_file", "Run",
    "RUN_ARTIFACTS", "run_loop", "save_config", "setup", "Stage", "stages", "StepContext", "StepRecord", "StepStats",
    "StepStream", "train", "train_step", "TrainConfig", "TrainResult",
]
