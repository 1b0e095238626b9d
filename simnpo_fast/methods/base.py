"""The method registry: what an unlearning method *is*, in one place.

A method is its forget objective (a :class:`~simnpo_fast.objectives.SequenceObjective` factory), its default
retain term (``"none"``, ``"nll"`` or ``"kl"``), whether it needs the reference model's cached log-likelihood of
every forget example (``reference="logp"``, e.g. NPO), whether it needs an alternate answer row for every forget
question (``alternate="idk"``: a refusal, e.g. IdkDPO; its forget objective is then a :class:`PairObjective`) and,
derived from the objective, its forget normaliser (``per="sequence"``: forget sequences with at least one answer
token; ``per="token"``: forget answer tokens; ``per="alternate_token"``: the alternate rows' answer tokens).
Everything that trains, plans or studies a method asks :func:`get_method` and reads these fields; nothing tests
a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from ..objectives import SequenceObjective

RETAIN_TERMS = ("none", "nll", "kl")
REFERENCES = ("none", "logp")
#: alternate answer rows a method asks for: none, or a refusal ("I don't know") for every forget question
ALTERNATES = ("none", "idk")


class PairObjective:
    """A forget term over pairs ``(forget row i, alternate row i)``: ``f_i = f(logp_sum_i, n_i, alt_logp_sum_i,
    alt_n_i[, extra_i])``, the summed answer log-likelihoods and answer-token counts of forget example ``i``'s
    answer and of its alternate answer (same question). The loss is ``sum_i f_i / normalizer``; the mean is over
    pairs whose forget row has at least one answer token (``per="sequence"``; a pair without one contributes 0)
    or over the answer tokens of the alternate rows (``per="alternate_token"``, e.g. an NLL on the alternates).
    Unlike a :class:`SequenceObjective`, the weight of a row may depend on the other row of its pair, so the loss
    runs on the differentiable ``sequence_logprob`` of both rows (not the single-pass fused path). Extras:
    ``ref_logp_sum`` / ``ref_alt_logp_sum`` (``reference="logp"``).
    """

    name = "pair"
    per = "sequence"

    def per_pair(self, logp_sum, n_tokens, alt_logp_sum, alt_n_tokens, **extra) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logp_sum, n_tokens, alt_logp_sum, alt_n_tokens, **extra) -> torch.Tensor:
        f = self.per_pair(logp_sum, n_tokens, alt_logp_sum, alt_n_tokens, **extra)
        valid = n_tokens > 0 if self.per == "sequence" else alt_n_tokens > 0
        return torch.where(valid, f, torch.zeros_like(f))

    def denominator(self, n_tokens: torch.Tensor, alt_n_tokens: torch.Tensor) -> int:
        """Pairs whose forget row has an answer token (``per="sequence"``), or the alternates' answer tokens."""
        return int((n_tokens > 0).sum()) if self.per == "sequence" else int(alt_n_tokens.sum())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True)
class Method:
    """One unlearning method.

    ``factory`` builds the forget objective from the method's hyper-parameters given as keywords; ``defaults``
    names those hyper-parameters with their default values (SimNPO ``{"beta": 2.5, "gamma": 0.0}``, NPO
    ``{"beta": 0.1}``, GA ``{}``): the one place a default is written, read by every loss, module, trainer and
    config (:meth:`forget_objective`). ``defaults=None``: the factory keeps its own keyword defaults
    (``lambda beta=None, gamma=0.0: ...``) and gets only the values given.
    ``retain`` is the default retain term (``loss.retain_loss`` may switch ``"nll"`` to ``"kl"``; a method with
    ``"none"`` never has one).
    ``reference="logp"``: the loss needs ``ref_logp_sum``, the frozen reference model's summed answer
    log-likelihood of each forget example (cached once before training), and for a method with alternates also
    ``ref_alt_logp_sum``, the same of its alternate answer. ``alternate="idk"``: every forget row comes with an
    alternate row, the same question answered by a refusal drawn from the data's ``idontknow.jsonl``
    (:mod:`simnpo_fast.data.alternates`); the forget objective is then a :class:`PairObjective`.
    """

    name: str
    factory: Callable[..., Union[SequenceObjective, PairObjective]]
    retain: str = "nll"
    reference: str = "none"
    summary: str = ""
    alternate: str = "none"
    defaults: Optional[Mapping[str, float]] = field(default=None, hash=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name != self.name.lower():
            raise ValueError(f"method name must be a non-empty lower-case string, got {self.name!r}")
        if self.retain not in RETAIN_TERMS:
            raise ValueError(f"method {self.name!r}: retain must be one of {RETAIN_TERMS}, got {self.retain!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"method {self.name!r}: reference must be one of {REFERENCES}, "
                             f"got {self.reference!r}")
        if self.alternate not in ALTERNATES:
            raise ValueError(f"method {self.name!r}: alternate must be one of {ALTERNATES}, got {self.alternate!r}")
        if isinstance(self.forget_objective(), PairObjective) != (self.alternate != "none"):
            raise ValueError(f"method {self.name!r}: a method with alternate rows (alternate={self.alternate!r}) "
                             "needs a PairObjective as its forget objective, and a PairObjective needs alternate rows")

    def forget_objective(self, beta: Optional[float] = None, gamma: Optional[float] = None):
        """The forget objective at ``beta`` / ``gamma``: ``None`` takes the method's default (:attr:`defaults`); a
        hyper-parameter the method does not have (NPO's ``gamma``, GA's ``beta``) is ignored."""
        given = {"beta": beta, "gamma": gamma}
        if self.defaults is None:
            return self.factory(**{k: v for k, v in given.items() if v is not None})
        return self.factory(**{k: v if given.get(k) is None else given[k] for k, v in self.defaults.items()})

    @property
    def per(self) -> str:
        """The forget normaliser: ``"sequence"``, ``"token"`` or ``"alternate_token"`` (the objective's ``per``)."""
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
