"""Finetune: plain token-mean NLL on the rows (the forget slot), no retain term (the finetune stage)."""
from ..objectives import NLL
from .base import Method, register_method


def _objective(beta=None, gamma=0.0):
    return NLL()


FINETUNE = register_method(Method("finetune", _objective, retain="none", summary="NLL on the data, token mean"))
