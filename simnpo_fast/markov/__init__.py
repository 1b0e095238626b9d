"""The SimNPO paper's mixture-of-Markov-chains study (Fan et al., 2024, arXiv 2410.07163, Sec. 5), through the
fused path: ``simnpo-fast study markov [--quick]``.

A retain chain and two forget chains over a few states; a small Llama is pretrained on their mixture and a twin
on the retain chain only (the "retrained" model); the pretrained model is unlearned with GA, GradDiff, NPO and
SimNPO (with and without a retain term), and the KL to the retrained model and to the true chains is tracked on
held-out sequences of each chain, with the per-sequence gradient weight each method gives forget1 vs forget2.
Two settings isolate the two halves of reference-model bias: forget chains of different lengths, and a forget
chain the pretrained model never saw.

Reference protocol: OPTML-Group/Unlearn-Simple, ``synthetic/`` (``run_synthetic.sh`` for the settings,
``data_generation.py``, ``train.py``, ``unlearn.py``, ``unlearn_utils.py``, ``evaluate_utils.py``); the code
here is our own.

Modules: :mod:`.chains` (matrices, sampling, batches), :mod:`.core` (model, training, fused evaluation,
gradient weights, the unlearning loop), :mod:`.study_report` (summary, plots, Markdown); the study's jobs, checkpoints
and workers: :mod:`simnpo_fast.studies.markov`.
"""
from .chains import CHAINS, initial_distribution, make_chain, sample, transition_chi2, transition_matrix
from .core import TrueChain, evaluate, sequence_weights

__all__ = ["CHAINS", "transition_matrix", "initial_distribution", "sample", "make_chain", "transition_chi2",
           "TrueChain", "evaluate", "sequence_weights"]
