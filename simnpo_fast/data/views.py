"""Evaluation views: a question with its true, paraphrased and perturbed (wrong) answers, tokenised as candidates.

Every candidate is encoded exactly like a training example (same template, ``prompt + answer`` tokenised in one
call as in TOFU's ``TextDatasetQA``, prompt = -100, EOS appended), so log-probabilities of the true answer, its
paraphrase and the perturbed answers are comparable (TOFU's truth ratio, the real-authors / world-facts option
accuracy).

Sources: ``forget{01,05,10}_perturbed`` and ``retain_perturbed`` (``paraphrased_answer``, a list
``perturbed_answer``, ``paraphrased_question``); ``real_authors`` / ``world_facts`` in either layout:
``*_perturbed.json`` with ``perturbed_answer`` or ``*.json`` with ``option1..optionK`` columns (the wrong
options are those different from ``answer``).
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

from .collate import DataCollator
from .formats import DataError, DataWarning, _lines, read_records, split_path
from .template import PromptTemplate, encode_qa_batch

CONTROL_SETS = ("real_authors", "world_facts")


def candidates_path(source: str, name: str) -> str:
    """The file :func:`load_candidates` reads for ``name``: a control set's ``_perturbed`` file when there is one,
    else its ``optionN`` file; any other name's own file."""
    if name in CONTROL_SETS:
        try:
            return split_path(source, name + "_perturbed")
        except FileNotFoundError:
            pass
    return split_path(source, name)


def load_candidates(source: str, name: str, *, question_field: str = "question", answer_field: str = "answer",
                    paraphrased_field: str = "paraphrased_answer", perturbed_field: str = "perturbed_answer",
                    paraphrased_question_field: str = "paraphrased_question", min_perturbed: int = 1) -> list[dict]:
    """Rows ``{"question", "answer", "paraphrased_answer" (or None), "perturbed_answer": [str, ...],
    "paraphrased_question" (or None)}`` of an evaluation split of a TOFU-layout folder.

    ``name`` is a file stem (``forget10_perturbed``) or a control set (``real_authors``, ``world_facts``: the
    ``_perturbed`` file is preferred, else the ``optionN`` file)."""
    path = candidates_path(source, name)
    rows, _ = read_records(path)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(path, f"expected a JSON object, got {type(r).__name__}", row=i)
        for f in (question_field, answer_field):
            if not isinstance(r.get(f), str):
                raise DataError(path, f"missing or not a string (row has fields {sorted(r)})", field=f, row=i)
        if perturbed_field in r:
            pert = r[perturbed_field]
            if isinstance(pert, str):
                pert = [pert]
            if not isinstance(pert, list) or not all(isinstance(p, str) for p in pert):
                raise DataError(path, "expected a list of strings", field=perturbed_field, row=i)
        else:
            opts = [k for k in r if k.startswith("option") and k[6:].isdigit()]
            if not opts:
                raise DataError(path, f"missing, and no option1..N columns (row has fields {sorted(r)})",
                                field=perturbed_field, row=i)
            opts.sort(key=lambda k: int(k[6:]))
            pert = [str(r[k]) for k in opts if str(r[k]) != r[answer_field]]
        if len(pert) < min_perturbed:
            raise DataError(path, f"{len(pert)} perturbed answers < min_perturbed={min_perturbed}",
                            field=perturbed_field, row=i)
        para = r.get(paraphrased_field)
        if para is not None and not isinstance(para, str):
            raise DataError(path, "expected a string", field=paraphrased_field, row=i)
        out.append({"question": r[question_field], "answer": r[answer_field], "paraphrased_answer": para,
                    "perturbed_answer": list(pert), "paraphrased_question": r.get(paraphrased_question_field)})
    return out


class CandidateDataset(torch.utils.data.Dataset):
    """Per question: ``{"row", "answer": ex, "paraphrased": ex | None, "perturbed": [ex, ...]}`` where every
    ``ex`` is an encoded ``{"input_ids", "labels"}`` example. Rows whose prompt does not fit are dropped
    (counted in ``dropped_rows``, warned); answers that overflow are truncated (counted, warned)."""

    def __init__(self, items: list[dict], dropped_rows: list[int], truncated: int, source: str):
        self.items, self.dropped_rows, self.truncated, self.source = items, dropped_rows, truncated, source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def encode_candidates(rows: Sequence[dict], tokenizer, *, template: str | PromptTemplate | None = None,
                      max_length: int = 512, question: str = "question", source: str = "candidates"
                      ) -> CandidateDataset:
    """Tokenise candidate sets from :func:`load_candidates`. ``question="paraphrased_question"`` asks the
    paraphrased question instead (rows without one raise :class:`DataError`)."""
    qs, ans, owner, kind = [], [], [], []
    for i, r in enumerate(rows):
        q = r.get(question)
        if not isinstance(q, str):
            raise DataError(source, "missing or not a string", field=question, row=i)
        cands = [("answer", r["answer"])]
        if r.get("paraphrased_answer") is not None:
            cands.append(("paraphrased", r["paraphrased_answer"]))
        cands += [("perturbed", p) for p in r["perturbed_answer"]]
        for k, a in cands:
            qs.append(q)
            ans.append(a)
            owner.append(i)
            kind.append(k)
    ex, kept, rep = encode_qa_batch(tokenizer, qs, ans, template=template, max_length=max_length,
                                    overlong="truncate", warn=False, source=source)
    bad = sorted({owner[j] for j in rep.dropped_prompt_too_long})
    bad_set = set(bad)
    items = {i: {"row": i, "answer": None, "paraphrased": None, "perturbed": []}
             for i in range(len(rows)) if i not in bad_set}
    for e, j in zip(ex, kept):
        it = items.get(owner[j])
        if it is None:
            continue
        if kind[j] == "perturbed":
            it["perturbed"].append(e)
        else:
            it[kind[j]] = e
    if bad:
        warnings.warn(f"{source}: dropped {len(bad)} question(s) whose prompt does not fit max_length="
                      f"{max_length} (rows {_lines(bad)})", DataWarning, stacklevel=2)
    if rep.truncated_answer:
        warnings.warn(f"{source}: truncated {len(rep.truncated_answer)} candidate answer(s) at max_length="
                      f"{max_length}", DataWarning, stacklevel=2)
    if rep.boundary_mismatch:
        warnings.warn(f"{source}: {len(rep.boundary_mismatch)} candidate(s) tokenise across the prompt/answer "
                      f"border (first len(prompt) tokens masked, as in the references)", DataWarning, stacklevel=2)
    return CandidateDataset([items[i] for i in sorted(items)], bad, len(rep.truncated_answer), source)


def load_eval_view(source: str, name: str, tokenizer, *, template: str | PromptTemplate | None = None,
                   max_length: int = 512, question: str = "question") -> CandidateDataset:
    """:func:`load_candidates` + :func:`encode_candidates` in one call."""
    rows = load_candidates(source, name)
    return encode_candidates(rows, tokenizer, template=template, max_length=max_length, question=question,
                             source=os.path.join(source, name))


class CandidateCollator:
    """Collate candidate items into padded batches: ``answer`` ``[B, T]``, ``paraphrased`` ``[B, T]`` (only when
    every item has one), ``perturbed`` ``[sum C_i, T]`` flattened with ``perturbed_owner`` ``[sum C_i]`` (the
    item of each row) and ``num_perturbed`` ``[B]``; ``row`` ``[B]`` gives the source rows."""

    def __init__(self, collator: DataCollator):
        self.collator = collator

    def __call__(self, items: Sequence[dict]) -> dict:
        out = {"row": torch.tensor([it["row"] for it in items], dtype=torch.long),
               "answer": self.collator.pad([it["answer"] for it in items])}
        if all(it["paraphrased"] is not None for it in items):
            out["paraphrased"] = self.collator.pad([it["paraphrased"] for it in items])
        pert = [p for it in items for p in it["perturbed"]]
        counts = [len(it["perturbed"]) for it in items]
        out["num_perturbed"] = torch.tensor(counts, dtype=torch.long)
        out["perturbed_owner"] = torch.repeat_interleave(torch.arange(len(items)), out["num_perturbed"])
        if pert:
            out["perturbed"] = self.collator.pad(pert)
        return out
