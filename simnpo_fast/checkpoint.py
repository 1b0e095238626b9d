"""Checkpoints of a training run: see :mod:`simnpo_fast.train.checkpoint` (this name is kept for importers)."""
from .train.checkpoint import *  # noqa: F401,F403
from .train.checkpoint import __all__  # noqa: F401
