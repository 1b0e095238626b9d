"""The offline WMDP stand-in of the synthetic corpus: raw-text biographies of the fictitious authors and
multiple-choice questions about them, written by :func:`simnpo_fast.data.synthetic.generate` into
``<corpus>/wmdp/``::

    wmdp/corpora/full.jsonl        {"text": biography} of every author
    wmdp/corpora/finetune.jsonl    every biography, then every question's "Question: {q}\nAnswer: {truth}" line
                                   (the facts in both forms: the stand-in's "pretraining" corpus)
    wmdp/corpora/forget.jsonl      the forget10 authors' biographies (WMDP's forget corpus)
    wmdp/corpora/retain.jsonl      the other authors' biographies (the retain corpus)
    wmdp/questions/forget.jsonl    {"question", "choices", "answer"} about the forget10 authors (WMDP's layout)
    wmdp/questions/retain.jsonl    the same about as many retain authors (the first ones)

A biography is the author's facts, one sentence each, in the first answer phrasing of the QA corpus (the
"full name" fact left out: its question names the other facts). A model trained on ``finetune.jsonl`` knows the
facts as text and as answers; unlearning then sees only the forget biographies (raw text, as WMDP's forget
corpora), and the questions, in lm-evaluation-harness's text format (``eval --task mcq --mcq-format text``, whose
prompt the question lines follow), measure what is left of the knowledge in the other form. A question asks one such fact (first question
phrasing) with 4 choices: the true value and 3 distinct values of the same fact stated in other authors' biographies (fresh values from the
generator's pools only when the corpus has too few), in a seeded random order.

Everything here draws from its own ``random.Random(f"wmdp-{seed}")``: the QA files, the tokenizer trained on them
and the split listing are unchanged by it (the subfolder is neither a split nor tokenizer text).
"""
from __future__ import annotations

import json
import os
import random
from typing import Sequence

WMDP_DIR = "wmdp"
N_CHOICES = 4


def biography(author: dict, facts: Sequence) -> str:
    """The author's facts (``synthetic.Fact`` objects, "full name" excluded), one sentence each."""
    return " ".join(f.answers[0].format(v=author[f.slot], **author) for f in facts if f.key != "full_name")


def _distractors(rng: random.Random, gen, slot: str, truth: str, pool: Sequence[str]) -> list[str]:
    others = sorted({v for v in pool if v != truth})
    picked = rng.sample(others, min(N_CHOICES - 1, len(others)))
    for _ in range(1000):
        if len(picked) == N_CHOICES - 1:
            return picked
        v = gen.value(slot)
        if v != truth and v not in picked:
            picked.append(v)
    raise RuntimeError(f"could not draw {N_CHOICES - 1} distractors for '{slot}'")  # pragma: no cover


def questions(authors: Sequence[dict], facts_of: Sequence[Sequence], rng: random.Random, gen,
              pool: dict) -> list[dict]:
    """Multiple-choice questions about ``authors`` (``facts_of[i]``: author i's facts); distractors from
    ``pool[slot]`` (the values other authors' biographies state), else fresh values of ``gen``."""
    out = []
    for a, facts in zip(authors, facts_of):
        for f in facts:
            if f.key == "full_name":
                continue
            truth = a[f.slot]
            choices = [truth] + _distractors(rng, gen, f.slot, truth, pool[f.slot])
            rng.shuffle(choices)
            out.append({"question": f.questions[0].format(**a), "choices": choices, "answer": choices.index(truth),
                        "fact": f.key, "author": a["name"]})
    return out


def _write(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_standin(out_dir: str, authors: Sequence[dict], facts_of: Sequence[Sequence], n_forget: int, seed: int,
                  gen_factory) -> dict[str, int]:
    """Write ``<out_dir>/wmdp/`` for the corpus's ``authors`` (the last ``n_forget`` are forgotten); returns
    ``{file: rows}``. ``gen_factory(rng)`` builds the corpus's value generator on this module's own RNG."""
    rng = random.Random(f"wmdp-{seed}")
    gen = gen_factory(rng)
    pool: dict = {}  # slot -> the values the corpus states (authors whose facts include it), in author order
    for a, fs in zip(authors, facts_of):
        for f in fs:
            pool.setdefault(f.slot, []).append(a[f.slot])
    n = len(authors)
    forget, retain = range(n - n_forget, n), range(n - n_forget)
    probe = list(retain)[:n_forget]  # retain questions: as many authors as forgotten
    bios = [{"text": biography(a, fs)} for a, fs in zip(authors, facts_of)]
    qs = [questions([a], [fs], rng, gen, pool) for a, fs in zip(authors, facts_of)]
    lines = [{"text": f"Question: {q['question']}\nAnswer: {q['choices'][q['answer']]}"} for aq in qs for q in aq]
    files = {
        "corpora/full.jsonl": bios,
        "corpora/finetune.jsonl": bios + lines,
        "corpora/forget.jsonl": [bios[i] for i in forget],
        "corpora/retain.jsonl": [bios[i] for i in retain],
        "questions/forget.jsonl": [q for i in forget for q in qs[i]],
        "questions/retain.jsonl": [q for i in probe for q in qs[i]],
    }
    for name, rows in files.items():
        _write(os.path.join(out_dir, WMDP_DIR, name), rows)
    return {name: len(rows) for name, rows in files.items()}
