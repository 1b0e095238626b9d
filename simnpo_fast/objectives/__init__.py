"""Unlearning objectives: one small file each on :class:`SequenceObjective`."""
from .base import REDUCTIONS, SequenceObjective
from .nll import GA, NLL, SequenceMean
from .npo import NPO
from .simnpo import SimNPO

#: the per-sequence objective classes by name (a *method* -- objective + retain term + reference -- is registered
#: in ``simnpo_fast.methods``)
OBJECTIVES = {cls.name: cls for cls in (SimNPO, NPO, GA, NLL)}

__all__ = ["SequenceObjective", "SequenceMean", "SimNPO", "NPO", "GA", "NLL", "OBJECTIVES", "REDUCTIONS"]

#: the meanings of ``normalize=`` of the token-normalised terms (retain NLL / KL, GA forget terms)
NORMALIZATIONS = ("token", "sequence")


def check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be 'token' or 'sequence', got {normalize!r}")
    return normalize
