"""GradDiff: gradient ascent on the forget set plus the retain term (NLL by default)."""
from ..objectives import GA
from .base import Method, register_method


def _objective(beta=None, gamma=0.0):
    return GA()


GRADDIFF = register_method(Method("graddiff", _objective, retain="nll", summary="GA on forget + retain NLL"))
