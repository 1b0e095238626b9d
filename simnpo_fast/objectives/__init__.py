"""Unlearning objectives: one small file each on :class:`SequenceObjective`."""
from .base import REDUCTIONS, SequenceObjective
from .nll import GA, NLL
from .npo import NPO
from .simnpo import SimNPO

#: the per-sequence objective classes by name (a *method* -- objective + retain term + reference -- is registered
#: in ``simnpo_fast.methods``)
OBJECTIVES = {cls.name: cls for cls in (SimNPO, NPO, GA, NLL)}

__all__ = ["SequenceObjective", "SimNPO", "NPO", "GA", "NLL", "OBJECTIVES", "REDUCTIONS"]
