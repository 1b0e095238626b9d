"""A byte-level BPE tokenizer trained on a TOFU-layout corpus, returned as a ``transformers`` fast tokenizer.

``train_tokenizer(data_dir, out_dir, vocab_size=4096)`` reads every string of every split file in
``data_dir`` (questions, answers, paraphrases, perturbed answers, options; not the refusals of
``idontknow.jsonl``), trains a byte-level BPE with the
``tokenizers`` library (any byte sequence is encodable: no unknown token), and wraps it in a
``PreTrainedTokenizerFast`` with ``<|bos|>`` / ``<|eos|>`` / ``<|pad|>`` (pad distinct from eos). ``tokenizer(text)``
prepends BOS like Llama tokenizers do. Saved with ``save_pretrained`` it reloads with
``AutoTokenizer.from_pretrained(out_dir)``; with a ``LlamaConfig(vocab_size=len(tok), bos_token_id=...,
eos_token_id=..., pad_token_id=...)`` it makes a real HF model folder that needs no download.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .alternates import IDK_FILE
from .formats import read_records

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def corpus_texts(data_dir: str, files: Sequence[str] | None = None) -> list[str]:
    """All strings of the split files of ``data_dir`` (``files``: stems or names to restrict to), deduplicated
    in first-seen order (the forget/retain files repeat ``full.json``)."""
    if files is None:
        paths = sorted(glob.glob(os.path.join(data_dir, "*.json")) + glob.glob(os.path.join(data_dir, "*.jsonl")))
        paths = [p for p in paths if os.path.basename(p) != IDK_FILE]  # plain-text refusals, not a split
    else:
        paths = [os.path.join(data_dir, f if f.endswith((".json", ".jsonl")) else f + ".json") for f in files]
    seen: dict[str, None] = {}
    for p in paths:
        rows, _ = read_records(p)
        for r in rows:
            for s in _strings(r):
                seen.setdefault(s, None)
    return list(seen)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``texts`` and wrap it (BOS prepended by ``tokenizer(text)``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="right", model_max_length=4096)


def train_tokenizer(data_dir: str, out_dir: str | None = None, vocab_size: int = 4096, *, min_frequency: int = 2,
                    files: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Train on the corpus in ``data_dir`` and, if ``out_dir`` is given, ``save_pretrained`` it there."""
    texts = corpus_texts(data_dir, files)
    if not texts:
        raise ValueError(f"{data_dir}: no text to train a tokenizer on")
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


#: Files of which at least one makes a folder a tokenizer folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Reload a tokenizer saved by :func:`train_tokenizer` (or any local HF tokenizer folder). A missing folder,
    a folder without tokenizer files or an unreadable file raises :class:`~simnpo_fast.errors.TokenizerError`
    naming the folder or the file (never a hub download)."""
    from transformers import AutoTokenizer

    from ..errors import TokenizerError

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: tokenizer folder not found")
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise TokenizerError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            try:
                with open(p, "rb") as f:
                    json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise TokenizerError(f"{p}: not valid JSON (truncated or damaged?): {e}") from None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers / tokenizers raise many types
        raise TokenizerError(f"{path}: cannot load the tokenizer ({', '.join(present)}): "
                             f"{type(e).__name__}: {e}") from e
