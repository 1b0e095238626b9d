"""IdkDPO: DPO with a refusal ("I don't know") as the preferred answer and the forget answer as the rejected one.

For forget question ``x_i`` with answer ``y_i`` and a refusal ``r_i`` (drawn from the data's ``idontknow.jsonl``),
with summed answer log-likelihoods ``log p(.|x_i)`` (EOS included, prompt masked) under the model and under the
reference (the model before unlearning):

    delta_i = [log p(r_i|x_i) - log p_ref(r_i|x_i)] - [log p(y_i|x_i) - log p_ref(y_i|x_i)]
    f_i     = -(2 / beta) * logsigmoid(beta * delta_i)
    loss    = forget_weight * mean_i f_i + retain_weight * (token-mean NLL of the retain answers)

d f_i / d log p(y_i|x_i) = 2 * sigmoid(-beta * delta_i) = -d f_i / d log p(r_i|x_i).

Reference definition: locuslab/open-unlearning ``src/trainer/unlearn/dpo.py`` (``DPO.compute_unlearn_loss``:
``gamma * forget_loss + alpha * retain_loss``, retain NLL by default, i.e. HF's token-mean ``outputs.loss``) and
``src/trainer/utils.py`` (``compute_dpo_loss``: win = the IDK answer, lose = the forget answer, summed per-sequence
log-likelihoods from ``compute_batch_nll``, ``-2 / beta * logsigmoid(beta * (win_log_ratio - lose_log_ratio))
.mean()``); the IDK rows come from ``src/data/qa.py`` (``QAwithIdkDataset``: the forget question with a refusal
drawn uniformly from the IDK file, lines stripped). The same loss is OPTML-Group/Unlearn-Simple
``TOFU/dataloader.py`` (``CustomTrainerForgetting.compute_loss``, ``forget_loss: dpo_grad_diff``; ``dpo_KL`` is
``loss.retain_loss=kl`` here). ``forget_weight`` / ``retain_weight`` are open-unlearning's ``gamma`` / ``alpha``.

Explicit options and deliberate differences:

* ``beta`` defaults to 0.1: locuslab/tofu ``dataloader.py`` (``CustomTrainerForgetting.compute_loss``, ``"dpo"``)
  hard-codes it and Unlearn-Simple's ``TOFU/config/forget.yaml`` sets it; open-unlearning's ``DPO`` class
  defaults to ``beta=1.0`` (pass ``beta=1.0`` for that).
* ``IdkDPO(beta, scale=1.0)`` is the original TOFU definition, ``-logsigmoid(beta * delta).mean()`` (no ``2 / beta``)
  and no retain term (its ``TextForgetDatasetDPOQA`` loads a retain row that the loss never uses): register it as a
  method with ``retain="none"`` or run ``idk_dpo`` with ``retain_weight=0``. (That branch reads the forget
  log-likelihoods with ``labels``, a name it never binds, so the published code does not run; Unlearn-Simple uses
  the forget labels, as here.)
* The refusal of each forget question is drawn uniformly per epoch from ``(seed, epoch, example)`` instead of
  ``torch.randint`` at every read: the same distribution, but reproducible and exactly resumable. The reference
  log-likelihoods are cached once before training (for every forget answer and every (question, refusal) pair:
  ``K`` + 1 scoring passes over the forget questions, no backward) instead of running a frozen reference model
  next to every step; the reference *is* the model before unlearning in both (same values up to rounding).
* The mean is over the pairs of the whole optimizer step (global :class:`~simnpo_fast.batch.StepCounts`), so
  gradient accumulation and data parallelism give the full-batch gradient; the references average per
  micro-batch (equal for one micro-batch per step).

Cost: the weight of a forget row depends on its refusal row, so the loss is built on the differentiable fused
``sequence_logprob`` of both rows (no ``[tokens, V]`` logits; its backward recomputes the logits tiles): 8NdV
flops for the N answer tokens of the forget and refusal rows instead of the 6NdV of the single-pass fused
objectives (SimNPO, NPO), plus the N refusal tokens themselves.
"""
import torch.nn.functional as F

from ..objectives.base import check_beta, check_finite
from .base import Method, PairObjective, register_method


class IdkDPO(PairObjective):
    """``f_i = -scale * logsigmoid(beta * delta_i)`` (module docstring), ``scale = 2 / beta`` unless given."""

    name = "idk_dpo"

    def __init__(self, beta: float, scale=None):
        self.beta = check_beta(beta)
        self.scale = 2.0 / self.beta if scale is None else check_finite(scale, "scale")

    def per_pair(self, logp_sum, n_tokens, alt_logp_sum, alt_n_tokens, *, ref_logp_sum=None, ref_alt_logp_sum=None,
                 **extra):
        if ref_logp_sum is None or ref_alt_logp_sum is None:
            raise ValueError("IdkDPO needs ref_logp_sum and ref_alt_logp_sum (the reference model's summed answer "
                             "log-likelihoods of the forget answers and of their refusals)")
        ref_f = ref_logp_sum.to(device=logp_sum.device, dtype=logp_sum.dtype)
        ref_a = ref_alt_logp_sum.to(device=logp_sum.device, dtype=logp_sum.dtype)
        delta = (alt_logp_sum - ref_a) - (logp_sum - ref_f)
        return -self.scale * F.logsigmoid(self.beta * delta)


IDK_DPO = register_method(Method("idk_dpo", IdkDPO, retain="nll", reference="logp", alternate="idk",
                                 defaults={"beta": 0.1},  # DPO has no margin: a gamma given to it is not used
                                 summary="IdkDPO: -(2/beta) logsigmoid(beta (log-ratio(idk) - log-ratio(forget)))"))
