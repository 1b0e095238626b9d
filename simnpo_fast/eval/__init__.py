"""Evaluation: TOFU and MUSE metrics, distributed (any world size, identical numbers), the relearning attack
and reports (JSON + Markdown + PNG).

Pure metrics (``metrics``)::

    length_normalised_prob, option_probability, truth_ratio, truth_ratio_stat, forget_quality (KS p-value),
    harmonic_mean, rouge_l / rouge_l_recall / rouge_l_f1, min_k_prob, auc, privleak

Model-side (``runner``; fused likelihoods, batched greedy generation, world-size-independent sharding)::

    logprobs(model, examples, pad_id, batch_size) -> [(logp_sum, n_tokens)]
    token_logprobs(model, examples, pad_id)       -> [[token log p, ...]]
    generate(model, prompts, max_new_tokens=, pad_id=, eos_id=, batch_size=) -> [[token ids]]

Benchmarks::

    evaluate_tofu(model, tokenizer, data_dir, TofuEvalConfig(forget_split="forget10"), reference=None) -> dict
    evaluate_muse(model, tokenizer, muse_dir, MuseEvalConfig(), retrain_auc=None) -> dict
"""
from . import metrics
from .runner import generate, logprobs, token_logprobs
from .tofu import TofuEvalConfig, evaluate_tofu, reference_truth_ratios, summarize

__all__ = ["metrics", "generate", "logprobs", "token_logprobs", "TofuEvalConfig", "evaluate_tofu",
           "reference_truth_ratios", "summarize"]
