"""Gradient ascent: the negated token-mean NLL of the forget answers, no retain term."""
from ..objectives import GA
from .base import Method, register_method


def _objective(beta=None, gamma=0.0):
    return GA()


GA_METHOD = register_method(Method("ga", _objective, retain="none", summary="GA: +log p(y|x), token mean"))
