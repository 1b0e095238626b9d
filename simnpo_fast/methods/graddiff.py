"""GradDiff: gradient ascent on the forget set plus the retain term (NLL by default)."""
from ..objectives import GA
from .base import Method, register_method

GRADDIFF = register_method(Method("graddiff", GA, retain="nll", defaults={}, summary="GA on forget + retain NLL"))
