"""Prompt templates and the QA / raw-text encoders that produce ``{"input_ids", "labels"}`` examples.

Masking rules (the part unlearning depends on), those of the benchmarks' reference code (locuslab/tofu
``data_module.convert_raw_data_to_model_format``; open-unlearning ``src/data/utils.preprocess_chat_instance``):

* ``labels`` are aligned with ``input_ids`` (HF style; the model code shifts them).
* The *whole* text ``prompt + answer`` is tokenised in one call, exactly as the references do, and the first
  ``len(tokenize(prompt))`` tokens (BOS, template tags, question) get ``-100``; the remaining tokens **and an
  appended EOS** are the targets. Tokenising the answer on its own instead would change the tokens at the
  border for SentencePiece tokenizers (Llama's dummy-prefix space) and so every score. When the prompt's own
  tokens are not a prefix of the joint tokenisation (a merge across the border), the first ``len(prompt)``
  tokens are masked all the same, as in the references, and the example is counted (``boundary_mismatch``)
  and warned about.
* Padding is the collator's job and is decided by lengths, never by comparing ids with ``pad_token_id``; a real
  EOS is therefore a target even when ``pad_token_id == eos_token_id`` (open-unlearning issue #128).
* Overlong examples: if the prompt plus one answer token does not fit, the example is dropped (counted, warned;
  or an error with ``overlong="error"``); if only the answer overflows it is cut (``overlong="truncate"``, the
  default: counted and warned, EOS lost; TOFU's ``truncation=True`` keeps the same first ``max_length``
  tokens) or dropped (``overlong="drop"``). Never a silent cut into the prompt.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .formats import DataError, DataWarning, _lines

IGNORE_INDEX = -100
EOS_PLACEHOLDER = "{eos_token}"


@dataclass(frozen=True)
class PromptTemplate:
    """How a QA pair becomes text: ``prompt = question_start + question + question_end + answer_start`` and
    ``full = prompt + answer_prefix + answer``; the prompt's tokens are masked, the rest plus EOS are targets.
    ``{eos_token}`` in a tag is replaced by the tokenizer's EOS string.

    ``add_bos``: ``True`` prepends the tokenizer's BOS (when it has one), ``False`` never does, ``None`` does
    what ``tokenizer(text, add_special_tokens=True)`` does (the references' call: BOS for Llama tokenizers and
    this project's BPE, nothing for GPT-2 / phi-1.5). With ``use_chat_template`` the tokenizer's chat template
    renders the prompt (``add_generation_prompt=True``) and the whole conversation (the answer as the assistant
    turn), both tokenised without special tokens, as ``apply_chat_template(tokenize=True)`` does
    (open-unlearning ``preprocess_chat_instance``). ``reference`` says where the format comes from."""

    name: str = "plain"
    question_start: str = "Question: "
    question_end: str = "\n"
    answer_start: str = "Answer:"
    answer_prefix: str = " "
    add_bos: bool | None = True
    use_chat_template: bool = False
    system_prompt: str | None = None
    reference: str = ""

    @staticmethod
    def _fill(text: str, tokenizer) -> str:
        if EOS_PLACEHOLDER in text:
            if tokenizer is None or tokenizer.eos_token is None:
                raise ValueError(f"template tag {text!r} needs a tokenizer with an eos_token")
            text = text.replace(EOS_PLACEHOLDER, tokenizer.eos_token)
        return text

    def _chat(self, question: str, answer: str | None, tokenizer) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template '{self.name}' needs a tokenizer with a chat_template")
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        msgs.append({"role": "user", "content": question})
        if answer is None:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        msgs.append({"role": "assistant", "content": answer})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)

    def prompt_text(self, question: str, tokenizer=None) -> str:
        if self.use_chat_template:
            return self._chat(question, None, tokenizer)
        return "".join(self._fill(t, tokenizer) for t in (self.question_start, question, self.question_end,
                                                         self.answer_start))

    def answer_text(self, answer: str, tokenizer=None) -> str:
        """The answer as it follows the prompt (non-chat templates)."""
        return answer if self.use_chat_template else self._fill(self.answer_prefix, tokenizer) + answer

    def full_text(self, question: str, answer: str, tokenizer=None) -> str:
        """The text tokenised in one call: prompt followed by the answer (or the rendered conversation)."""
        if self.use_chat_template:
            return self._chat(question, answer, tokenizer)
        return self.prompt_text(question, tokenizer) + self.answer_text(answer, tokenizer)

    def bos_ids(self, tokenizer) -> list[int]:
        """The BOS this template prepends with ``tokenizer`` (``[]`` or ``[bos_token_id]``)."""
        bos = tokenizer.bos_token_id
        if self.use_chat_template or bos is None or self.add_bos is False:
            return []
        if self.add_bos is None and not adds_bos(tokenizer):
            return []
        return [bos]


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text, add_special_tokens=True)`` prepends the BOS token (Llama and this project's BPE
    do; GPT-2 / phi-1.5 tokenizers do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_sp) > len(without) and with_sp[0] == bos


#: Built-in templates by model family, each with the reference string it reproduces.
TEMPLATES: dict[str, PromptTemplate] = {
    "plain": PromptTemplate(
        name="plain",
        reference="this project's own format: 'Question: {q}\\nAnswer:' + ' {a}' (BOS whenever the tokenizer has "
                  "one; no benchmark reference)"),
    "phi": PromptTemplate(
        name="phi", question_start="Question: ", question_end="\n", answer_start="", answer_prefix="Answer: ",
        add_bos=None,
        reference="locuslab/tofu config/model_config.yaml 'phi' (question_start_tag 'Question: ', "
                  "question_end_tag '\\n', answer_tag 'Answer: ') as data_module.convert_raw_data_to_model_format "
                  "uses it: 'Question: {q}\\n' masked, 'Answer: {a}' + EOS the target"),
    "llama2": PromptTemplate(
        name="llama2", question_start="[INST] ", question_end=" [/INST]", answer_start="", answer_prefix="",
        add_bos=None,
        reference="locuslab/tofu config/model_config.yaml 'llama2-7b' and open-unlearning "
                  "configs/model/Llama-2-7b-chat-hf.yaml: '[INST] ' + q + ' [/INST]' + a, no space before the "
                  "answer (asst_start_tag '')"),
    "zephyr": PromptTemplate(
        name="zephyr", question_start="<|user|>\n", question_end=EOS_PLACEHOLDER + "\n",
        answer_start="<|assistant|>\n", answer_prefix="", add_bos=False,
        reference="the chat template of HuggingFaceH4/zephyr-7b-beta rendered with add_generation_prompt: "
                  "'<|user|>\\n' + q + eos + '\\n<|assistant|>\\n', then a + EOS (no BOS, as "
                  "apply_chat_template tokenises)"),
    "chat": PromptTemplate(
        name="chat", use_chat_template=True, answer_prefix="", add_bos=False,
        reference="open-unlearning src/data/utils.preprocess_chat_instance with apply_chat_template: True"),
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
    boundary_mismatch: list[int] = field(default_factory=list)  # prompt tokens not a prefix of the joint ones
    short_windows: int = 0  # raw text: last windows shorter than the window length (kept, padded later)
    dropped_short_windows: int = 0  # raw text: windows under min_tokens (dropped)

    def summary(self) -> str:
        return (f"{self.kept}/{self.total} kept; dropped {len(self.dropped_prompt_too_long)} (prompt too long) + "
                f"{len(self.dropped_answer_too_long)} (answer too long); {len(self.truncated_answer)} answers "
                f"truncated (EOS lost); {len(self.empty_answer)} empty answers; {len(self.boundary_mismatch)} "
                f"prompt/answer border merges")


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
    ``rows`` the input index of each kept example. ``overlong`` in ``truncate`` / ``drop`` / ``error``.

    ``input_ids = BOS? + tokenize(full_text)`` and the first ``len(BOS? + tokenize(prompt_text))`` labels are
    -100 (TOFU ``convert_raw_data_to_model_format``: ``num_question_tokens = len(tokenizer.tokenize(question,
    add_special_tokens=True))``); EOS is appended as a target unless the text already ends with it
    (open-unlearning ``preprocess_chat_instance``)."""
    if overlong not in ("truncate", "drop", "error"):
        raise ValueError(f"overlong must be 'truncate', 'drop' or 'error', got {overlong!r}")
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    tpl = get_template(template, tokenizer)
    _, eos = _special_ids(tokenizer)
    questions, answers = list(questions), list(answers)
    prompts = [tpl.prompt_text(q, tokenizer) for q in questions]
    fulls = [tpl.full_text(q, a, tokenizer) for q, a in zip(questions, answers)]
    p_ids = token_ids(tokenizer, prompts)
    f_ids = token_ids(tokenizer, fulls)
    head = tpl.bos_ids(tokenizer)
    rep = EncodeReport(total=len(prompts))
    examples, rows = [], []
    for i, (p, f) in enumerate(zip(p_ids, f_ids)):
        if f[: len(p)] != p:
            rep.boundary_mismatch.append(i)
        a = list(f[len(p):])
        p = head + list(f[: len(p)])
        if add_eos and not (a and a[-1] == eos):
            a = a + [eos]
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
    if rep.boundary_mismatch:
        msgs.append(f"{len(rep.boundary_mismatch)} example(s) tokenise across the prompt/answer border; their "
                    f"first len(prompt) tokens are masked as in the references (rows {_lines(rep.boundary_mismatch)})")
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
