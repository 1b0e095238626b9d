"""The method registry: what an unlearning method *is*, in one place.

A method is its forget objective (a :class:`~simnpo_fast.objectives.SequenceObjective` factory), its default
retain term (``"none"``, ``"nll"`` or ``"kl"``), whether it needs the reference model's cached log-likelihood of
every forget example (``reference="logp"``, e.g. NPO) and, derived from the objective, its forget normaliser
(``per="sequence"``: forget sequences with at least one answer token; ``per="token"``: forget answer tokens).
Everything that trains, plans or studies a method asks :func:`get_method` and reads these fields; nothing
tests a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

from ..objectives import SequenceObjective

RETAIN_TERMS = ("none", "nll", "kl")
REFERENCES = ("none", "logp")


@dataclass(frozen=True)
class Method:
    """One unlearning method.

    ``forget_objective(beta=None, gamma=0.0)`` builds the forget objective; ``beta=None`` takes the method's
    default and methods without a ``beta`` / ``gamma`` ignore them. ``retain`` is the default retain term
    (``loss.retain_loss`` may switch ``"nll"`` to ``"kl"``; a method with ``"none"`` never has one).
    ``reference="logp"``: the loss needs ``ref_logp_sum``, the frozen reference model's summed answer
    log-likelihood of each forget example (cached once before training).
    """

    name: str
    forget_objective: Callable[..., SequenceObjective]
    retain: str = "nll"
    reference: str = "none"
    summary: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name != self.name.lower():
            raise ValueError(f"method name must be a non-empty lower-case string, got {self.name!r}")
        if self.retain not in RETAIN_TERMS:
            raise ValueError(f"method {self.name!r}: retain must be one of {RETAIN_TERMS}, got {self.retain!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"method {self.name!r}: reference must be one of {REFERENCES}, "
                             f"got {self.reference!r}")

    @property
    def per(self) -> str:
        """The forget normaliser: ``"sequence"`` or ``"token"`` (the objective's ``per``)."""
        return self.forget_objective().per


_REGISTRY: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` under ``method.name``; a different method already registered under that name is an error."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a Method, got {type(method).__name__}")
    old = _REGISTRY.get(method.name)
    if old is not None and old != method:
        raise ValueError(f"a different method is already registered as {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def method_names() -> List[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name) -> Method:
    """The method registered as ``name`` (case-insensitive); ``ValueError`` naming it and the registered names."""
    if isinstance(name, Method):
        return name
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; registered methods: {', '.join(method_names())}")
    return _REGISTRY[key]
