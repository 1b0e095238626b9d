"""NPO (Zhang et al., 2024, arXiv 2404.05868): needs the reference model's cached forget log-likelihoods. NPO has
no margin: a ``gamma`` given to it is not used."""
from ..objectives import NPO
from .base import Method, register_method

NPO_METHOD = register_method(Method("npo", NPO, retain="nll", reference="logp", defaults={"beta": 0.1},
                                    summary="NPO: -(2/beta) logsigmoid(-beta (log p - log p_ref))"))
