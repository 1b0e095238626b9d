"""Data for unlearning: TOFU / MUSE / generic QA and text as forget-retain batches, plus an embedded corpus.

Embedded default, no downloads (``simnpo_fast.data.synthetic`` + ``tokenizer``)::

    synthetic.generate(out_dir, n_authors=200, facts_per_author=20, seed=0, n_perturbed=5) -> {split: rows}
    train_tokenizer(data_dir, out_dir=None, vocab_size=4096)  -> PreTrainedTokenizerFast (BOS/EOS/PAD, pad != eos)
    <out_dir>/wmdp/ (synthetic_wmdp): the WMDP stand-in, raw-text biographies + 4-choice questions of the authors

Loading (``formats``; every file of a TOFU-layout folder is ``<split>.json`` in JSON Lines)::

    load_tofu(source, split)            -> datasets.Dataset(question, answer, ...)   folder or hub id
    load_qa(path, question_field=, answer_field=)   JSON / JSONL / parquet         -> datasets.Dataset
    load_text(path, text_field=), load_muse(folder, splits=("forget", "retain", "holdout")) -> documents
    find_overlap(forget, retain)        -> shared forget rows (warns with the count)
    DataError / DataFileNotFoundError (name file, row, field), DataWarning (counts)

Encoding (``template``; labels aligned with input_ids, prompt = -100, answer + EOS are targets)::

    get_template(name | PromptTemplate | None, tokenizer)    "plain", "phi", "llama2", "zephyr", "chat"
    encode_qa(dataset, tokenizer, template=, max_length=, overlong="truncate"|"drop"|"error") -> EncodedDataset
    encode_text_windows(documents, tokenizer, window=)       MUSE windows, BOS prepended  -> EncodedDataset

Batching (``collate``, ``pairs``, ``sampler``)::

    DataCollator.from_tokenizer(tok, padding_side="right")   -> input_ids / attention_mask / labels tensors
    ForgetRetainDataset(forget, retain, seed=, pairing="random"|"cycle"|"fixed")  items {"forget", "retain"}
        (retain=None: items {"forget"}, a method without a retain term)
    load_forget_retain(source, tokenizer, "forget10", retain_split=None -> "retain90", ...) -> ForgetRetainDataset
    ShardedBatchSampler(n, batch_size, rank=, world_size=, seed=, drop_last=, lengths=)  set_epoch,
        state_dict(consumed=) / load_state_dict: exact mid-epoch resume; same global batches for any world size

Alternate answers (``alternates``; IDK methods such as ``idk_dpo``)::

    load_idk(path)                      -> refusal answers, one per line (TOFU's idontknow.jsonl, IDK_FILE)
    encode_alternates(questions, answers, tokenizer, template=, max_length=, seed=) -> AlternateAnswers
    WithAlternates(dataset, alternates) items gain "alternate" (drawn per (seed, epoch)) and "alternate_index"
    load_forget_retain(..., idk=True)   -> WithAlternates over <source>/idontknow.jsonl

Evaluation views (``views``)::

    load_candidates(source, "forget10_perturbed" | "retain_perturbed" | "real_authors" | "world_facts")
    load_eval_view(source, name, tokenizer) -> CandidateDataset items {"answer", "paraphrased", "perturbed": [...]}
    CandidateCollator(collator)   -> answer / paraphrased [B, T], perturbed [sum C, T] + perturbed_owner
"""
from . import synthetic
from .alternates import IDK_FILE, AlternateAnswers, WithAlternates, encode_alternates, forget_questions, load_idk
from .collate import DataCollator
from .formats import (RETAIN_OF, TOFU_HUB_ID, TOFU_SPLITS, DataError, DataFileNotFoundError, DataWarning,
                      ReadReport, find_overlap, list_splits, load_muse, load_qa, load_text, load_tofu,
                      read_records, split_path)
from .pairs import ForgetRetainDataset, load_forget_retain
from .sampler import ShardedBatchSampler
from .template import (IGNORE_INDEX, TEMPLATES, EncodedDataset, EncodeReport, PromptTemplate, encode_qa,
                       encode_qa_batch, encode_text_windows, get_template, with_template)
from .tokenizer import build_tokenizer, load_tokenizer, train_tokenizer
from .views import CandidateCollator, CandidateDataset, encode_candidates, load_candidates, load_eval_view

__all__ = [
    "synthetic", "train_tokenizer", "build_tokenizer", "load_tokenizer",
    "load_tofu", "load_qa", "load_text", "load_muse", "read_records", "list_splits", "split_path", "find_overlap",
    "TOFU_SPLITS", "TOFU_HUB_ID", "RETAIN_OF", "DataError", "DataFileNotFoundError", "DataWarning", "ReadReport",
    "PromptTemplate", "TEMPLATES", "get_template", "with_template", "encode_qa", "encode_qa_batch",
    "encode_text_windows", "EncodedDataset", "EncodeReport", "IGNORE_INDEX",
    "DataCollator", "ForgetRetainDataset", "load_forget_retain", "ShardedBatchSampler",
    "load_candidates", "encode_candidates", "load_eval_view", "CandidateDataset", "CandidateCollator",
    "IDK_FILE", "load_idk", "encode_alternates", "forget_questions", "AlternateAnswers", "WithAlternates",
]
