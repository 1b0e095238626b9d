"""Gradient ascent: the negated token-mean NLL of the forget answers, no retain term."""
from ..objectives import GA
from .base import Method, register_method

GA_METHOD = register_method(Method("ga", GA, retain="none", defaults={}, summary="GA: +log p(y|x), token mean"))
