"""SimNPO (Fan et al., 2024, arXiv 2410.07163): length-normalised, reference-free NPO + retain NLL."""
from ..objectives import SimNPO
from .base import Method, register_method

SIMNPO = register_method(Method("simnpo", SimNPO, retain="nll", defaults={"beta": 2.5, "gamma": 0.0},
                                summary="SimNPO: -(2/beta) logsigmoid(-(beta/|y|) log p(y|x) - gamma)"))
