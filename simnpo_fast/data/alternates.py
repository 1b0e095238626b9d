"""Alternate answers to the forget questions: the preferred rows of DPO-style methods (IdkDPO) and the like.

TOFU ships ``idontknow.jsonl``: refusals ("I don't know", ...), one per line, plain text despite the extension;
the synthetic corpus writes its own. Both references read it with ``open(path).readlines()`` and ``.strip()``
each line (locuslab/tofu ``data_module.py``, ``TextForgetDatasetDPOQA``; locuslab/open-unlearning
``src/data/qa.py``, ``QAwithIdkDataset``) and pair every forget question with one refusal drawn uniformly at each
read (``torch.randint``), encoded with the forget set's template.

Here every forget example ``k`` has ``K`` candidates, ``examples[k * K + j]`` = its question with answer ``j``
(:func:`encode_alternates`), and :class:`AlternateAnswers` draws one per example per epoch, uniformly, from
``(seed, epoch)``: the references' distribution, reproducible and exactly resumable, and a finite table whose
reference log-likelihoods can be cached once before training. :class:`WithAlternates` adds the drawn row to the
items of a forget (or forget/retain) dataset.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch

from .formats import DataError, DataFileNotFoundError, DataWarning, _lines
from .template import EncodedDataset, encode_qa_batch

#: TOFU's name (and place: the data folder) of the refusal answers
IDK_FILE = "idontknow.jsonl"


def load_idk(path: str) -> list[str]:
    """The refusal answers of ``path``, one per line, stripped. Blank lines are skipped with a
    :class:`DataWarning` naming them; a missing file, undecodable text or no answer at all is a
    :class:`DataError` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileNotFoundError(path, f"refusal answers not found (one per line; TOFU ships {IDK_FILE}, the "
                                          "synthetic corpus writes one)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    answers = [s.strip() for s in lines]
    blank = [i + 1 for i, s in enumerate(answers) if not s]
    answers = [s for s in answers if s]
    if not answers:
        raise DataError(path, "holds no refusal answer")
    if blank:
        warnings.warn(f"{path}: skipped {len(blank)} blank line(s) (lines {_lines(blank)})", DataWarning, stacklevel=2)
    return answers


class AlternateAnswers(torch.utils.data.Dataset):
    """``K`` encoded candidate alternates for each of ``n_forget`` forget examples (``examples[k * K + j]``) and,
    per epoch, the drawn one: :meth:`index` ``(k) = k * K + j_k`` with ``j_k`` uniform in ``[0, K)`` from
    ``(seed, epoch)`` (the same on every rank and process). ``len()`` is the size of the candidate table."""

    def __init__(self, examples: EncodedDataset, n_forget: int, n_choices: int, *, seed: int = 0):
        if n_choices < 1 or len(examples) != n_forget * n_choices:
            raise ValueError(f"{len(examples)} alternate examples for {n_forget} forget examples x {n_choices} "
                             "candidates")
        self.examples, self.n_forget, self.n_choices = examples, int(n_forget), int(n_choices)
        self.seed, self.epoch = int(seed), 0
        self._draw()

    def _draw(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch, 1])  # a stream of its own (the pairing uses [seed, epoch])
        self._choice = rng.integers(self.n_choices, size=self.n_forget)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._draw()

    def index(self, k: int) -> int:
        """The candidate-table index of forget example ``k``'s alternate this epoch."""
        return int(k) * self.n_choices + int(self._choice[k])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def encode_alternates(questions: Sequence[str], answers: Sequence[str], tokenizer, *, template=None,
                      max_length: int = 512, seed: int = 0, source: str = "alternates") -> AlternateAnswers:
    """Every question with every answer (``questions[k]`` of forget example ``k``; e.g. :func:`load_idk`), encoded
    like the forget examples (same template and ``max_length``: an over-long answer is truncated, never
    dropped, so the table stays ``len(questions) x len(answers)``)."""
    answers = list(answers)
    if not answers:
        raise ValueError(f"{source}: no alternate answers")
    qs = [q for q in questions for _ in answers]
    ans = answers * len(questions)
    ex, rows, rep = encode_qa_batch(tokenizer, qs, ans, template=template, max_length=max_length,
                                    overlong="truncate", source=source)
    if len(ex) != len(qs):
        raise DataError(source, f"{len(qs) - len(ex)} (question, alternate) pair(s) do not fit max_length="
                                f"{max_length} (their prompt alone is too long)")
    return AlternateAnswers(EncodedDataset(ex, rows, rep, source), len(questions), len(answers), seed=seed)


def forget_questions(rows, encoded: EncodedDataset, question_field: str = "question") -> list[str]:
    """The question of each encoded forget example (``encoded.rows`` index the source ``rows``, some of which
    may have been dropped by the encoder)."""
    col = rows[question_field] if hasattr(rows, "column_names") else [r[question_field] for r in rows]
    return [col[r] for r in encoded.rows]


class WithAlternates(torch.utils.data.Dataset):
    """The items of ``dataset`` (``{"forget": ..., ["retain": ...]}``, one per forget example) plus this epoch's
    ``"alternate"`` example of that forget example and its ``"alternate_index"`` in ``alternates``.
    :meth:`set_epoch` re-draws both the dataset's pairing (when it has one) and the alternates."""

    def __init__(self, dataset, alternates: AlternateAnswers):
        if len(dataset) != alternates.n_forget:
            raise ValueError(f"{len(dataset)} forget items but alternates for {alternates.n_forget}")
        self.dataset, self.alternates = dataset, alternates

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        item = dict(self.dataset[i])
        j = self.alternates.index(i)
        item["alternate"] = self.alternates[j]
        item["alternate_index"] = j
        return item

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.alternates.set_epoch(epoch)

    def __getattr__(self, name):  # the wrapped dataset's attributes (``forget``, ``retain``, ``lengths``, ...)
        if name in ("dataset", "alternates"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)
