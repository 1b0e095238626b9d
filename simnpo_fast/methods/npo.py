"""NPO (Zhang et al., 2024, arXiv 2404.05868): needs the reference model's cached forget log-likelihoods."""
from ..objectives import NPO
from .base import Method, register_method


def _objective(beta=None, gamma=0.0):
    return NPO(0.1 if beta is None else beta)  # NPO has no margin: gamma is not used


NPO_METHOD = register_method(Method("npo", _objective, retain="nll", reference="logp",
                                    summary="NPO: -(2/beta) logsigmoid(-beta (log p - log p_ref))"))
