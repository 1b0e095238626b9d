"""Evaluation: TOFU and MUSE metrics, distributed (any world size, identical numbers), the relearning attack
and reports (JSON + Markdown + PNG).

Pure metrics (``metrics``)::

    length_normalised_prob, option_probability, truth_ratio, truth_ratio_stat, forget_quality (KS p-value),
    harmonic_mean, rouge_l / rouge_l_recall / rouge_l_f1, min_k_prob, auc, privleak

Model-side (``runner``; fused likelihoods, batched greedy generation, world-size-independent sharding)::

    logprobs(model, examples, pad_id, batch_size) -> [(logp_sum, n_tokens)]
    token_logprobs(model, examples, pad_id)       -> [[token log p, ...]]
    generate(model, prompts, max_new_tokens=, pad_id=, eos_id=, batch_size=) -> [[token ids]]

Benchmarks, attack, reports::

    evaluate_tofu(model, tokenizer, data_dir, TofuEvalConfig(forget_split="forget10"), reference=None) -> dict
    evaluate_muse(model, tokenizer, muse_dir, MuseEvalConfig(), retrain_auc=None) -> dict
    relearn_attack(model, tokenizer, data_dir, RelearnConfig(n_examples=20, steps=10), reference=) -> dict
    write_report({name: result}, out_dir, history=None) -> {name: json, "markdown", "plot", "curves"}
    EvalHook(data_dir, tokenizer, every=N)     trainer hook (``hooks={"after_backward": hook}``)

Models: any HF causal LM (``model.model`` backbone + ``get_output_embeddings()``), an ``UnlearnModel`` (``.lm``),
or a DDP/FSDP wrapper; in ``torch.distributed`` every rank must call the same functions (results are gathered).
"""
from . import metrics
from .hook import EvalHook
from .muse import MuseEvalConfig, evaluate_muse
from .relearn import RelearnConfig, relearn_attack
from .report import write_report
from .runner import generate, logprobs, token_logprobs
from .tofu import TofuEvalConfig, evaluate_tofu, reference_truth_ratios, summarize

__all__ = ["metrics", "generate", "logprobs", "token_logprobs", "TofuEvalConfig", "evaluate_tofu",
           "reference_truth_ratios", "summarize", "MuseEvalConfig", "evaluate_muse", "RelearnConfig",
           "relearn_attack", "write_report", "EvalHook"]
