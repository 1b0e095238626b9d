"""Evaluation: TOFU, MUSE and multiple-choice (WMDP / MMLU) metrics, distributed (any world size, identical numbers), the relearning attack
and reports (JSON + Markdown + PNG).

Pure metrics (``metrics``; the reference code's definitions, cited there)::

    length_normalised_prob, option_probability, truth_ratio_logp / truth_ratio (geometric mean, as the TOFU
    code), truth_ratio_stat (max(0, 1-R)), forget_truth_ratio_stat (min(R, 1/R)), forget_quality (KS p-value),
    harmonic_mean, rouge_l_recall (TOFU, stemmed) / rouge_l_f1 (MUSE, unstemmed), min_k_score (MUSE Min-K%),
    roc_auc, privleak_auc (forget = 0, holdout = 1), privleak (percent), AUC_RETRAIN (news / books)

Model-side (``runner``; fused likelihoods, batched greedy generation, world-size-independent sharding)::

    logprobs(model, examples, pad_id, batch_size) -> [(logp_sum, n_tokens)]
    token_logprobs(model, examples, pad_id)       -> [[token log p, ...]]
    generate(model, prompts, max_new_tokens=, pad_id=, eos_id=, batch_size=) -> [[token ids]]

Benchmarks, attack, reports::

    evaluate_tofu(model, tokenizer, data_dir, TofuEvalConfig(protocol="tofu"|"open-unlearning"), reference=None)
    evaluate_muse(model, tokenizer, muse_dir, MuseEvalConfig(corpus="news"), retrain_auc=None) -> dict
    evaluate_mcq(model, tokenizer, file_or_folder, McqEvalConfig(format="letters"|"text")) -> dict  (WMDP / MMLU,
        lm-evaluation-harness's zero-shot multiple-choice protocol)
    relearn_attack(model, tokenizer, data_dir, RelearnConfig(n_examples=20, steps=10), reference=) -> dict
    write_report({name: result}, out_dir, history=None) -> {name: json, "markdown", "plot", "curves"}
    EvalHook(data_dir, tokenizer, every=N)     trainer hook (``hooks={"after_backward": hook}``)

Models: any HF causal LM (its backbone by :func:`simnpo_fast.model.backbone_of` + ``get_output_embeddings()``), an
``UnlearnModel`` (``.lm``), or a DDP/FSDP wrapper; in ``torch.distributed`` every rank must call the same functions
(results are gathered).
"""
from . import metrics
from .hook import EvalHook
from .mcq import McqEvalConfig, evaluate_mcq, load_mcq
from .muse import MuseEvalConfig, evaluate_muse, load_muse_files
from .relearn import RelearnConfig, relearn_attack
from .result_files import write_report
from .runner import generate, logprobs, token_logprobs
from .tofu import PROTOCOLS, TofuEvalConfig, evaluate_tofu, reference_truth_ratios, summarize

__all__ = ["metrics", "generate", "logprobs", "token_logprobs", "TofuEvalConfig", "evaluate_tofu",
           "reference_truth_ratios", "summarize", "PROTOCOLS", "MuseEvalConfig", "evaluate_muse",
           "load_muse_files", "McqEvalConfig", "evaluate_mcq", "load_mcq", "RelearnConfig",
           "relearn_attack", "write_report", "EvalHook"]
