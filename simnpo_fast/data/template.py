"""Prompt templates and the QA / raw-text encoders that produce ``{"input_ids", "labels"}`` examples.

Masking rules (the part unlearning depends on):

* ``labels`` are aligned with ``input_ids`` (HF style; the model code shifts them).
* Prompt tokens (BOS, template tags, question) get ``-100``; the answer tokens **and the appended EOS** are the
  targets. The prompt and the answer are tokenised separately and concatenated, so the boundary is exact (no
  "tokenise prompt alone and hope the count matches" off-by-one).
* Padding is the collator's job and is decided by lengths, never by comparing ids with ``pad_token_id``; a real
  EOS is therefore a target even when ``pad_token_id == eos_token_id`` (open-unlearning issue #128).
* Overlong examples: if the prompt plus one answer token does not fit, the example is dropped (counted, warned;
  or an error with ``overlong="error"``); if only the answer overflows it is cut (``overlong="truncate"``, the
  default: counted and warned, EOS lost) or dropped (``overlong="drop"``). Never a silent cut into the prompt.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .formats import DataError, DataWarning, _lines

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt. ``prompt = question_start + question + question_end + answer_start``;
    the answer is tokenised as ``answer_prefix + answer`` (the space lives with the answer, as in running text).
    With ``use_chat_template`` the tokenizer's chat template renders the prompt instead (BOS comes from it)."""

    name: str = "plain"
    question_start: str = "Question: "
    question_end: str = "\n"
    answer_start: str = "Answer:"
    answer_prefix: str = " "
    add_bos: bool = True
    use_chat_template: bool = False
    system_prompt: str | None = None

    def prompt_text(self, question: str, tokenizer=None) -> str:
        if self.use_chat_template:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"template '{self.name}' needs a tokenizer with a chat_template")
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs.append({"role": "user", "content": question})
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return f"{self.question_start}{question}{self.question_end}{self.answer_start}"

    def answer_text(self, answer: str) -> str:
        return answer if self.use_chat_template else self.answer_prefix + answer


#: Built-in templates by model family. ``chat`` defers to ``tokenizer.chat_template``.
TEMPLATES: dict[str, PromptTemplate] = {
    "plain": PromptTemplate(),
    "phi": PromptTemplate(name="phi"),  # TOFU's phi-1.5 format is the plain Question/Answer one
    "llama2": PromptTemplate(name="llama2", question_start="[INST] ", question_end=" [/INST]", answer_start=""),
    "zephyr": PromptTemplate(name="zephyr", question_start="<|user|>\n", question_end="\n",
                             answer_start="<|assistant|>\n", answer_prefix=""),
    "chat": PromptTemplate(name="chat", use_chat_template=True, answer_prefix=""),
}


def get_template(template: str | PromptTemplate | None = None, tokenizer=None) -> PromptTemplate:
    """Resolve a template: an instance, a name in :data:`TEMPLATES`, or ``None`` = ``chat`` when the tokenizer
    has a chat template, else ``plain``."""
    if isinstance(template, PromptTemplate):
        return template
    if template is None:
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


@dataclass
class EncodeReport:
    """Counts of one encoding pass (row numbers refer to the input order)."""

    total: int = 0
    kept: int = 0
    dropped_prompt_too_long: list[int] = field(default_factory=list)
    dropped_answer_too_long: list[int] = field(default_factory=list)
    truncated_answer: list[int] = field(default_factory=list)
    empty_answer: list[int] = field(default_factory=list)
    short_windows: int = 0  # raw text: last windows shorter than the window length (kept, padded later)
    dropped_short_windows: int = 0  # raw text: windows under min_tokens (dropped)

    def summary(self) -> str:
        return (f"{self.kept}/{self.total} kept; dropped {len(self.dropped_prompt_too_long)} (prompt too long) + "
                f"{len(self.dropped_answer_too_long)} (answer too long); {len(self.truncated_answer)} answers "
                f"truncated (EOS lost); {len(self.empty_answer)} empty answers")


def _special_ids(tokenizer) -> tuple[int | None, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (answers must end with EOS)")
    return tokenizer.bos_token_id, eos


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added. Uses the Rust backend's batch encoder directly when
    the tokenizer is a fast one (several times faster than ``tokenizer(...)``), else ``tokenizer(...)``."""
    texts = list(texts)
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_qa_batch(tokenizer, questions: Sequence[str], answers: Sequence[str], *,
                    template: str | PromptTemplate | None = None, max_length: int = 512,
                    overlong: str = "truncate", add_eos: bool = True, warn: bool = True,
                    source: str = "QA data") -> tuple[list[dict], list[int], EncodeReport]:
    """Encode QA pairs. Returns ``(examples, rows, report)``: examples are ``{"input_ids", "labels"}`` lists,
    ``rows`` the input index of each kept example. ``overlong`` in ``truncate`` / ``drop`` / ``error``."""
    if overlong not in ("truncate", "drop", "error"):
        raise ValueError(f"overlong must be 'truncate', 'drop' or 'error', got {overlong!r}")
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    tpl = get_template(template, tokenizer)
    bos, eos = _special_ids(tokenizer)
    questions, answers = list(questions), list(answers)
    prompts = [tpl.prompt_text(q, tokenizer) for q in questions]
    p_ids = token_ids(tokenizer, prompts)
    a_ids = token_ids(tokenizer, [tpl.answer_text(a) for a in answers])
    head = [bos] if (tpl.add_bos and not tpl.use_chat_template and bos is not None) else []
    tail = [eos] if add_eos else []
    rep = EncodeReport(total=len(prompts))
    examples, rows = [], []
    for i, (p, a) in enumerate(zip(p_ids, a_ids)):
        p = head + p
        a = a + tail
        if not answers[i].strip():
            rep.empty_answer.append(i)
        if len(p) + 1 > max_length:
            if overlong == "error":
                raise DataError(source, f"prompt of {len(p)} tokens leaves no room for the answer "
                                f"(max_length={max_length})", row=i, field="question")
            rep.dropped_prompt_too_long.append(i)
            continue
        if len(p) + len(a) > max_length:
            if overlong == "error":
                raise DataError(source, f"{len(p) + len(a)} tokens > max_length={max_length}", row=i, field="answer")
            if overlong == "drop":
                rep.dropped_answer_too_long.append(i)
                continue
            a = a[: max_length - len(p)]
            rep.truncated_answer.append(i)
        examples.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})
        rows.append(i)
    rep.kept = len(examples)
    if warn:
        _warn_encode(rep, source, max_length)
    return examples, rows, rep


def _warn_encode(rep: EncodeReport, source: str, max_length: int) -> None:
    msgs = []
    if rep.dropped_prompt_too_long:
        msgs.append(f"dropped {len(rep.dropped_prompt_too_long)} example(s) whose prompt does not fit "
                    f"(rows {_lines(rep.dropped_prompt_too_long)})")
    if rep.dropped_answer_too_long:
        msgs.append(f"dropped {len(rep.dropped_answer_too_long)} overlong example(s) "
                    f"(rows {_lines(rep.dropped_answer_too_long)})")
    if rep.truncated_answer:
        msgs.append(f"truncated the answer of {len(rep.truncated_answer)} example(s), losing their EOS "
                    f"(rows {_lines(rep.truncated_answer)})")
    if msgs:
        warnings.warn(f"{source}: max_length={max_length}: " + "; ".join(msgs), DataWarning, stacklevel=3)


class EncodedDataset(torch.utils.data.Dataset):
    """A list of ``{"input_ids", "labels"}`` examples (python int lists) with their source rows and report."""

    def __init__(self, examples: list[dict], rows: list[int] | None = None, report: EncodeReport | None = None,
                 source: str = ""):
        self.examples = examples
        self.rows = list(range(len(examples))) if rows is None else rows
        self.report = report or EncodeReport(total=len(examples), kept=len(examples))
        self.source = source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for length bucketing)."""
        return [len(e["input_ids"]) for e in self.examples]

    def keys(self) -> list[tuple]:
        """Hashable identity of each example (its token ids), for overlap checks."""
        return [tuple(e["input_ids"]) for e in self.examples]

    def to_hf(self):
        """The examples as a ``datasets.Dataset`` (columns ``input_ids``, ``labels``, ``row``)."""
        import datasets
        return datasets.Dataset.from_dict({"input_ids": [e["input_ids"] for e in self.examples],
                                           "labels": [e["labels"] for e in self.examples], "row": self.rows})


def encode_qa(data, tokenizer, *, template: str | PromptTemplate | None = None, max_length: int = 512,
              overlong: str = "truncate", add_eos: bool = True, question_field: str = "question",
              answer_field: str = "answer", source: str | None = None) -> EncodedDataset:
    """Encode a QA ``datasets.Dataset`` (or list of dicts) into an :class:`EncodedDataset`."""
    if hasattr(data, "column_names"):
        for name in (question_field, answer_field):
            if name not in data.column_names:
                raise DataError(source or "dataset", f"missing (columns: {data.column_names})", field=name)
        cols = data.select_columns([question_field, answer_field]).to_dict()  # fast columnar read
        qs, ans = cols[question_field], cols[answer_field]
    else:
        qs, ans = [r[question_field] for r in data], [r[answer_field] for r in data]
    source = source or "QA data"
    ex, rows, rep = encode_qa_batch(tokenizer, qs, ans, template=template, max_length=max_length,
                                    overlong=overlong, add_eos=add_eos, source=source)
    return EncodedDataset(ex, rows, rep, source)


def encode_text_windows(texts: Sequence[str], tokenizer, *, window: int = 2048, add_bos: bool = True,
                        min_tokens: int = 1, source: str = "text") -> EncodedDataset:
    """MUSE-style raw text: each document is tokenised and cut into consecutive windows of ``window`` tokens,
    BOS prepended to every window (counted in the window). Labels = input_ids with the BOS position at -100.
    The last window of a document may be shorter (counted in ``report.short_windows``; the collator pads it);
    windows with fewer than ``min_tokens`` text tokens are dropped and counted."""
    bos, _ = _special_ids(tokenizer)
    head = [bos] if add_bos and bos is not None else []
    step = window - len(head)
    if step < 1:
        raise ValueError(f"window={window} leaves no room for text")
    ids = token_ids(tokenizer, texts)
    rep = EncodeReport(total=0)
    examples, rows = [], []
    for d, toks in enumerate(ids):
        for s in range(0, len(toks), step):
            chunk = toks[s:s + step]
            rep.total += 1
            if len(chunk) < min_tokens:
                rep.dropped_short_windows += 1
                continue
            if len(chunk) < step:
                rep.short_windows += 1
            examples.append({"input_ids": head + chunk, "labels": [IGNORE_INDEX] * len(head) + chunk})
            rows.append(d)
    rep.kept = len(examples)
    if rep.dropped_short_windows:
        warnings.warn(f"{source}: dropped {rep.dropped_short_windows} window(s) shorter than min_tokens={min_tokens}",
                      DataWarning, stacklevel=2)
    empty = [i for i, t in enumerate(ids) if not t]
    if empty:
        warnings.warn(f"{source}: {len(empty)} empty document(s) (docs {_lines(empty)})", DataWarning, stacklevel=2)
    return EncodedDataset(examples, rows, rep, source)


def with_template(template: PromptTemplate, **changes) -> PromptTemplate:
    """A copy of ``template`` with fields changed (e.g. ``with_template(TEMPLATES['plain'], answer_start='A:')``)."""
    return replace(template, **changes)
