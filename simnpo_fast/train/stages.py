"""A run as stages above the loop: the optional finetune stage, then the configured method on its result.

    result = train(cfg)            # same code from 1 CPU process to torchrun --nnodes N --nproc_per_node G

Each stage is a :class:`Stage` (its own resolved config) run through the same :func:`run_stage` (setup +
:func:`~simnpo_fast.train.loop.run_loop`). The run's output folder is claimed first
(:func:`~simnpo_fast.train.run_folder.open_run`: lock, run id, fresh / resume / overwrite); the finetune stage
trains into ``<output_dir>/finetune`` (a folder of its own, claimed the same way) and its exported HF folder
becomes the model of the next stage. A finished finetune stage is reused only when it was made with the same
finetune config; otherwise the run stops (``--overwrite`` or another output_dir) rather than unlearn from a
model the config does not describe.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from ..distributed import init_distributed
from ..errors import RunFolderError
from .config import FinetuneConfig, TrainConfig, finetune_config
from .config_io import config_to_dict
from .loop import TrainResult, run_loop
from .run_folder import RunFolder, config_differences, open_run, read_run_file
from .setup import setup
from .validation import check_data_names, check_overwrite_keeps_inputs

#: What a run writes into its output_dir: the files ``overwrite`` moves aside together (plus ``data`` when the
#: synthetic corpus is the run's own, i.e. ``data.path`` is unset).
RUN_ARTIFACTS = ("checkpoints", "run.json", "log.jsonl", "config.yaml", "eval.json", "curves.png", "hf", "hf.tmp",
                 "finetune")


@dataclass
class Stage:
    """One training job of a run: ``name`` (for messages) and its resolved config."""

    name: str
    cfg: TrainConfig

    @property
    def hf_dir(self) -> str:
        return os.path.join(self.cfg.output_dir, "hf")


def on_finetuned(cfg: TrainConfig, ft: TrainConfig) -> TrainConfig:
    """``cfg`` starting from the model the finetune stage ``ft`` exports (and reading its synthetic corpus)."""
    new = copy.deepcopy(cfg)
    new.model = dataclasses.replace(cfg.model, path=os.path.join(ft.output_dir, "hf"), preset=None, config={})
    new.finetune = FinetuneConfig(enabled=False)
    if new.data.kind == "synthetic" and new.data.path is None:
        new.data.path = ft.data.path
    return new


def stages(cfg: TrainConfig) -> List[Stage]:
    """The stages of ``cfg`` in order: ``finetune`` when enabled, then the configured method."""
    if not cfg.finetune.enabled:
        return [Stage(cfg.loss.objective, cfg)]
    ft = finetune_config(cfg)
    return [Stage("finetune", ft), Stage(cfg.loss.objective, on_finetuned(cfg, ft))]


@contextlib.contextmanager
def claim(cfg: TrainConfig, *, overwrite: bool = False) -> Iterator[Tuple[RunFolder, dict]]:
    """Check ``cfg``, join the process group and hold its output folder: yields ``(folder, requested)``, the
    requested config as a dict (stored in ``run.json`` and every checkpoint)."""
    cfg.validate()
    check_data_names(cfg)
    info = init_distributed(cfg.parallel.device)
    requested = config_to_dict(cfg)
    artifacts = RUN_ARTIFACTS + (("data",) if cfg.data.kind == "synthetic" and cfg.data.path is None else ())
    if overwrite:
        check_overwrite_keeps_inputs(cfg, artifacts)
    with open_run(cfg.output_dir, requested, resume=cfg.checkpoint.resume, overwrite=overwrite,
                  artifacts=artifacts, is_main=info.is_main) as folder:
        yield folder, requested


def run_stage(stage: Stage, folder: RunFolder, requested: dict, hooks: Optional[dict] = None) -> TrainResult:
    """Set up ``stage`` and run its loop in the claimed ``folder``."""
    return run_loop(setup(stage.cfg), folder, requested, hooks)


def ensure_finished(stage: Stage) -> None:
    """Run an inner stage in its own folder unless it has already finished with this very config."""
    if os.path.isfile(os.path.join(stage.hf_dir, "config.json")):
        rec = read_run_file(stage.cfg.output_dir)
        diffs = config_differences(rec.get("config", {}), config_to_dict(stage.cfg)) if rec else ["run.json: missing"]
        if diffs:
            raise RunFolderError(
                f"{stage.cfg.output_dir} holds a model made with another {stage.name} config "
                f"({'; '.join(diffs)}); pass --overwrite to move the previous run aside, or choose another output_dir")
        return
    with claim(stage.cfg) as (folder, requested):
        run_stage(stage, folder, requested)


def train(cfg: TrainConfig, *, hooks: Optional[dict] = None, overwrite: bool = False) -> TrainResult:
    """Run (or resume) ``cfg``: claim its output folder, finish the inner stages, run the last one there.
    Collective under torchrun. ``overwrite``: start fresh over another run's checkpoints, moving that run aside;
    ``checkpoint.resume`` (true / auto) resumes only a verified checkpoint of this run with an unchanged config.
    ``hooks`` apply to the last stage: ``{"after_backward": fn(run, s)}`` is called before optimizer step ``s``
    (gradients complete), ``{"after_step": fn(run, s)}`` after step ``s`` is logged and checkpointed."""
    with claim(cfg, overwrite=overwrite) as (folder, requested):
        *inner, last = stages(cfg)
        for stage in inner:
            ensure_finished(stage)
        return run_stage(last, folder, requested, hooks)
