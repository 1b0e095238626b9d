"""Finetune: plain token-mean NLL on the rows (the forget slot), no retain term (the finetune stage)."""
from ..objectives import NLL
from .base import Method, register_method

FINETUNE = register_method(Method("finetune", NLL, retain="none", defaults={},
                                  summary="NLL on the data, token mean"))
