"""The training config: typed sections with defaults, validated strictly before any work.

    cfg = TrainConfig()                      # or train.config_io.load_config("default", ["optim.lr=1e-4"])
    cfg.validate(world_size)                 # every bad key, type or value: a ConfigError naming it

Batch geometry: ``batch_size`` sequences per optimizer step over all ranks and micro-batches, i.e.
``batch_size = world_size * micro_batch_size * grad_accum`` (:func:`grad_accum`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigError
from ..methods.finetune import FINETUNE
from ..methods.simnpo import SIMNPO
from ..model import ModelConfig
from .validation import validate_config

#: The method of the finetune stage (its registry name): plain NLL on ``data.finetune_split``.
FINETUNE_METHOD = FINETUNE.name


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | tofu | qa | muse
    path: Optional[str] = None  # data folder (synthetic: generated there; default <output_dir>/data)
    forget_split: str = "forget10"  # the rows the method trains on
    retain_split: str = "retain90"
    finetune_split: str = "full"  # the finetune stage's rows
    template: str = "plain"
    max_length: int = 256
    window: int = 256  # muse: tokens per window
    tokenizer: Optional[str] = None  # folder; default: model.path, or trained on the synthetic corpus
    vocab_size: int = 1024  # tokenizer trained on the synthetic corpus
    synthetic: Dict[str, Any] = field(default_factory=lambda: {"n_authors": 20, "facts_per_author": 10, "seed": 0})
    pairing: str = "random"


@dataclass
class LossConfig:
    objective: str = "simnpo"  # a registered method (simnpo_fast.methods.method_names())
    beta: Optional[float] = None  # None: the method's default (its Method.defaults in simnpo_fast/methods/)
    gamma: float = SIMNPO.defaults["gamma"]  # SimNPO's margin (the registry's default); methods without one ignore it
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    retain_loss: str = "nll"  # nll | kl (for methods with a retain term)
    # token-normalised terms (retain NLL / KL, the GA forget term of ga / graddiff): token = the sum over the step's
    # answer tokens / their count; sequence = the mean over sequences of each sequence's token mean (the SimNPO
    # authors' one-row micro-batches, OPTML-Group/Unlearn-Simple TOFU/dataloader.py compute_loss)
    normalize: str = "token"
    # gradient filter of every fused term (simnpo_fast.backends.filter): auto (exact) | off | on | a mapping of
    # GradFilter's fields, e.g. {rows: 1.0e-3, probs: 0.000244}
    grad_filter: Any = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    warmup_from_zero: bool = False  # true: step s < W takes s / W of lr (HF's warmup: the first step takes 0)
    weight_decay_rule: str = "all"  # all | hf (HF Trainer's: no decay on biases and normalisation weights)
    min_lr_ratio: float = 0.0


@dataclass
class ParallelConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | bf16 | no
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    compile: bool = False
    reshard_after_forward: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only the final one
    keep: int = 2  # newest checkpoints kept (0: all)
    resume: Union[bool, str] = False  # true: continue from the newest verified checkpoint (error if none);
    #                                   auto: resume if there is one, else start fresh
    final: bool = True  # checkpoint after the last step
    export_hf: bool = True  # write <output_dir>/hf at the end


@dataclass
class FinetuneConfig:
    """Optional first stage (embedded default): plain NLL on ``data.finetune_split`` so there is something to
    unlearn; the result (an HF folder) becomes the unlearning stage's model."""

    enabled: bool = False
    epochs: float = 10
    lr: float = 3e-3
    batch_size: int = 16
    micro_batch_size: int = 16
    schedule: str = "cosine"
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str = "runs/default"
    seed: int = 0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 32  # global: sequences per optimizer step over all ranks and micro-batches
    micro_batch_size: int = 4  # forget (and as many retain) sequences per rank per forward
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    evaluate: bool = True  # forget / retain mean log-likelihood before and after
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Fail before any work on a config that cannot run (:class:`~simnpo_fast.errors.ConfigError` naming the
        key). Normalises ``data.synthetic`` (integers) in place. With ``world_size``, also the batch geometry
        of this run and of its finetune stage."""
        validate_config(self)
        if world_size is not None:
            grad_accum(self, world_size)
            if self.finetune.enabled:
                grad_accum(finetune_config(self), world_size, prefix="finetune.")


def grad_accum(cfg: TrainConfig, world_size: int, prefix: str = "") -> int:
    """Micro-batches per rank per optimizer step; a ConfigError when ``batch_size`` does not split evenly."""
    per_rank, r = divmod(cfg.batch_size, world_size)
    if r or per_rank % cfg.micro_batch_size:
        raise ConfigError(f"{prefix}batch_size={cfg.batch_size} must be a multiple of {prefix}micro_batch_size * "
                          f"world_size = {cfg.micro_batch_size} * {world_size}")
    return per_rank // cfg.micro_batch_size


def finetune_config(cfg: TrainConfig) -> TrainConfig:
    """The finetune stage's config derived from an unlearning config: :data:`FINETUNE_METHOD` on
    ``data.finetune_split`` with the ``finetune`` section's schedule, written to ``<output_dir>/finetune``,
    no checkpoints but the exported HF folder, no evaluation."""
    f = cfg.finetune
    ft = copy.deepcopy(cfg)
    ft.name = cfg.name + "-finetune"
    ft.output_dir = os.path.join(cfg.output_dir, "finetune")
    ft.loss = LossConfig(objective=FINETUNE_METHOD, retain_weight=0.0)
    ft.data.forget_split = cfg.data.finetune_split
    ft.epochs, ft.max_steps = f.epochs, 0
    ft.batch_size, ft.micro_batch_size = f.batch_size, f.micro_batch_size
    ft.optim = dataclasses.replace(cfg.optim, lr=f.lr, schedule=f.schedule, warmup_steps=f.warmup_steps,
                                   warmup_ratio=0.0)
    ft.finetune = FinetuneConfig(enabled=False)
    ft.checkpoint = CheckpointConfig(every=0, resume=False, final=False, export_hf=True)
    ft.evaluate = False
    if ft.data.kind == "synthetic" and ft.data.path is None:
        ft.data.path = os.path.join(cfg.output_dir, "data")
    return ft
