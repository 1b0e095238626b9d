"""simnpo-fast: fused, memory-frugal LLM unlearning.

The public surface is small::

    sequence_logprob(hidden, weight, labels)          -> (logp_sum [B], n_tokens [B])
    simnpo_loss / npo_loss / ga_loss / nll_loss       -> scalar (or [B] with reduction="none")
    FusedSimNPOLoss, FusedNPOLoss, FusedNLLLoss, FusedGALoss, UnlearningLoss   (nn.Modules)
    UnlearningCriterion                               method + retain term + normalisation: criterion(head, hidden, batch, counts)
    get_method(name) -> Method                        the method registry (simnpo, npo, ga, graddiff, finetune)
    ForgetRetainBatch, StepCounts                     one micro-batch's layout, one optimizer step's global counts
    patch(hf_model)                                   HF drop-in: forward(labels=...) returns the fused loss

No function holds the [tokens, vocab] logits unless backend="reference" is asked for.
"""
from .backends import available_backends, get_backend
from .batch import ForgetRetainBatch, StepCounts
from .criterion import UnlearningCriterion
from .methods import Method, get_method, method_names, register_method
from .modules import (FusedGALoss, FusedNLLLoss, FusedNPOLoss, FusedSimNPOLoss, LossOutput, ReferenceHead,
                      UnlearningLoss)
from .objectives import GA, NLL, NPO, OBJECTIVES, SequenceObjective, SimNPO
from .ops import (fused_sequence_loss, ga_loss, kl_loss, nll_loss, npo_loss, sequence_logprob, simnpo_loss)


def __getattr__(name):  # lazy: the HF glue imports transformers, which `import simnpo_fast` does not need
    if name == "patch":
        from .model import patch

        return patch
    raise AttributeError(f"module 'simnpo_fast' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "sequence_logprob", "simnpo_loss", "npo_loss", "ga_loss", "nll_loss", "kl_loss", "fused_sequence_loss",
    "FusedSimNPOLoss", "FusedNPOLoss", "FusedNLLLoss", "FusedGALoss", "UnlearningLoss", "UnlearningCriterion",
    "LossOutput",
    "ReferenceHead", "ForgetRetainBatch", "StepCounts", "Method", "get_method", "method_names", "register_method",
    "SequenceObjective", "SimNPO", "NPO", "GA", "NLL", "OBJECTIVES",
    "available_backends", "get_backend", "patch", "__version__",
]
