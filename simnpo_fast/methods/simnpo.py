"""SimNPO (Fan et al., 2024, arXiv 2410.07163): length-normalised, reference-free NPO + retain NLL."""
from ..objectives import SimNPO
from .base import Method, register_method


def _objective(beta=None, gamma=0.0):
    return SimNPO(2.5 if beta is None else beta, gamma)


SIMNPO = register_method(Method("simnpo", _objective, retain="nll",
                                summary="SimNPO: -(2/beta) logsigmoid(-(beta/|y|) log p(y|x) - gamma)"))
