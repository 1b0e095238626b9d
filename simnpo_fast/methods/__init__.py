"""Unlearning methods, one file each, registered by name.

Adding a method: a file here that builds a :class:`Method` (a forget objective from ``simnpo_fast/objectives``,
its retain term, its reference need) and calls :func:`register_method`, one import line below, and a test.
"""
from .base import REFERENCES, RETAIN_TERMS, Method, get_method, method_names, register_method
from . import finetune, ga, graddiff, npo, simnpo  # noqa: F401,E402  (registers the built-in methods)

__all__ = ["Method", "register_method", "get_method", "method_names", "RETAIN_TERMS", "REFERENCES"]
