"""Unlearning methods, one file each, registered by name.

Adding a method: a file here that builds a :class:`Method` (a forget objective from ``simnpo_fast/objectives``,
or a :class:`PairObjective` over forget / alternate answer pairs; its retain term, its reference need, its
alternate rows) and calls :func:`register_method`, one import line below, and a test (``idk_dpo.py`` and
``tests/methods/test_idk_dpo.py`` are a worked example).
"""
from .base import ALTERNATES, REFERENCES, RETAIN_TERMS, Method, PairObjective, get_method, method_names, register_method
from . import finetune, ga, graddiff, idk_dpo, npo, simnpo  # noqa: F401,E402  (registers the built-in methods)

__all__ = ["Method", "PairObjective", "register_method", "get_method", "method_names", "RETAIN_TERMS", "REFERENCES",
           "ALTERNATES"]
