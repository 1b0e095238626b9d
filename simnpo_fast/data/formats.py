"""Reading data from disk (or the hub) into ``datasets.Dataset`` objects, with loud, precise errors.

Three kinds of source share this module:

* **TOFU layout**: a folder of JSON Lines files named after their split (``full.json``, ``forget10.json``,
  ``retain90.json``, ``forget10_perturbed.json``, ``real_authors_perturbed.json``, ...). The real TOFU data
  and the embedded synthetic corpus (:mod:`simnpo_fast.data.synthetic`) are both read by :func:`load_tofu`.
  A hub id such as ``locuslab/TOFU`` is passed to ``datasets.load_dataset`` (needs a network).
* **Generic QA**: any JSON (array), JSON Lines or parquet file with question / answer fields whose names are
  configurable (:func:`load_qa`).
* **Raw text** (MUSE style): ``.txt`` files (one document each), JSON / JSONL / parquet with a text field, or a
  JSON array of strings (:func:`load_text`, :func:`load_muse`).

Bad input is never silent: a missing file or field raises :class:`DataError` (or :class:`DataFileNotFoundError`)
naming the file, row and field; undecodable (non-UTF-8) or unparsable lines and empty splits are skipped,
counted in a :class:`ReadReport` and announced with a :class:`DataWarning` (or raised with ``on_bad="raise"``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import datasets

TOFU_HUB_ID = "locuslab/TOFU"

#: Split names of the TOFU layout (the synthetic corpus writes exactly these; TOFU has a few more).
TOFU_SPLITS = (
    "full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed",
)
#: The matching retain split of each forget split (TOFU naming: forgetXX <-> retain(100-XX)).
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90",
             "forget20": "retain80", "forget30": "retain70", "forget50": "retain50", "forget90": "retain10"}

_DATA_EXTS = (".json", ".jsonl", ".parquet")
_MAX_LISTED = 8  # line numbers quoted in a warning


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the row and the field."""

    def __init__(self, path: str, message: str, *, field: str | None = None, row: int | None = None):
        self.path, self.field, self.row = path, field, row
        where = path
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file (split) does not exist; the message lists what the folder does hold."""


class DataWarning(UserWarning):
    """Something was skipped, truncated or is suspicious; the message carries the count."""


class EmptySplitWarning(DataWarning):
    """A file or split holds no rows. The command line turns it into an error (:func:`empty_splits_are_errors`)."""


@contextlib.contextmanager
def empty_splits_are_errors():
    """Within the block an empty split raises :class:`EmptySplitWarning` (a ``DataWarning``) instead of warning:
    a metric over no examples is no result."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptySplitWarning)
        yield


@dataclass
class ReadReport:
    """What happened while reading one file. Line numbers are 1-based."""

    path: str
    rows: int = 0
    blank_lines: int = 0
    bad_utf8_lines: list[int] = field(default_factory=list)
    bad_json_lines: list[int] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad_utf8_lines) + len(self.bad_json_lines)

    def summary(self) -> str:
        return (f"{self.path}: {self.rows} rows read, {len(self.bad_utf8_lines)} non-UTF-8 lines skipped, "
                f"{len(self.bad_json_lines)} unparsable lines skipped, {self.blank_lines} blank lines")


def _lines(nums: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in nums[:_MAX_LISTED])
    return shown + (", ..." if len(nums) > _MAX_LISTED else "")


def _warn_report(rep: ReadReport, on_bad: str) -> None:
    problems = []
    if rep.bad_utf8_lines:
        problems.append(f"{len(rep.bad_utf8_lines)} non-UTF-8 line(s) (lines {_lines(rep.bad_utf8_lines)})")
    if rep.bad_json_lines:
        problems.append(f"{len(rep.bad_json_lines)} unparsable JSON line(s) (lines {_lines(rep.bad_json_lines)})")
    if problems:
        msg = " and ".join(problems)
        if on_bad == "raise":
            raise DataError(rep.path, msg)
        warnings.warn(f"{rep.path}: skipped {msg}", DataWarning, stacklevel=3)
    if rep.rows == 0:
        if on_bad == "raise":
            raise DataError(rep.path, "the file holds no rows (empty split)")
        warnings.warn(f"{rep.path}: empty split (0 rows)", EmptySplitWarning, stacklevel=3)


def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ("warn", "raise"):
        raise ValueError(f"on_bad must be 'warn' or 'raise', got {on_bad!r}")


def read_records(path: str, *, on_bad: str = "warn") -> tuple[list, ReadReport]:
    """Read the rows of a ``.json`` / ``.jsonl`` (JSON Lines or one JSON array) or ``.parquet`` file.

    Returns ``(rows, report)``; rows are whatever each line / array element holds (normally dicts).
    JSON Lines: a non-UTF-8 or unparsable line is skipped and counted. A JSON array that does not decode or
    parse raises :class:`DataError` (a single document cannot be partly kept).
    """
    _check_on_bad(on_bad)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileNotFoundError(path, "file not found")
    rep = ReadReport(path)
    if path.endswith(".parquet"):
        try:
            rows = datasets.Dataset.from_parquet(path, keep_in_memory=True).to_list()
        except Exception as e:  # pyarrow raises several types
            raise DataError(path, f"cannot read parquet: {e}") from e
        rep.rows = len(rows)
        _warn_report(rep, on_bad)
        return rows, rep
    with open(path, "rb") as f:
        raw = f.read()
    if raw.lstrip()[:1] == b"[":  # one JSON array
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(path, f"not UTF-8 at byte {e.start}") from e
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON array: {e}") from e
        rep.rows = len(rows)
        _warn_report(rep, on_bad)
        return rows, rep
    rows = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            rep.blank_lines += 1
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            rep.bad_utf8_lines.append(lineno)
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError:
            rep.bad_json_lines.append(lineno)
    rep.blank_lines -= 1 if raw.endswith(b"\n") else 0  # the final newline is not a blank line
    rep.rows = len(rows)
    _warn_report(rep, on_bad)
    return rows, rep


def _require_str(path: str, rows: list, fields: Iterable[str]) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(path, f"expected a JSON object, got {type(row).__name__}", row=i)
        for name in fields:
            if name not in row:
                raise DataError(path, f"missing (row has fields {sorted(row)})", field=name, row=i)
            if not isinstance(row[name], str):
                raise DataError(path, f"expected a string, got {type(row[name]).__name__}", field=name, row=i)


def records_to_qa(rows: list, path: str, *, question_field: str = "question", answer_field: str = "answer",
                  extra_fields: Sequence[str] | None = None) -> datasets.Dataset:
    """Validate QA rows and build a ``datasets.Dataset`` with columns ``question``, ``answer`` (renamed from the
    configured fields) plus ``extra_fields`` (default: every other key of the first row, required in all rows)."""
    _require_str(path, rows, (question_field, answer_field))
    if extra_fields is None:
        extra_fields = [k for k in (rows[0] if rows else {}) if k not in (question_field, answer_field)]
    cols: dict[str, list] = {"question": [r[question_field] for r in rows], "answer": [r[answer_field] for r in rows]}
    for name in extra_fields:
        vals = []
        for i, r in enumerate(rows):
            if name not in r:
                raise DataError(path, f"missing (row has fields {sorted(r)})", field=name, row=i)
            vals.append(r[name])
        cols[name if name not in ("question", "answer") else f"orig_{name}"] = vals
    empty = [i for i, a in enumerate(cols["answer"]) if not a.strip()]
    if empty:
        warnings.warn(f"{path}: {len(empty)} row(s) with an empty answer (rows {_lines(empty)}); "
                      "their only target is EOS", DataWarning, stacklevel=3)
    return datasets.Dataset.from_dict(cols)


def load_qa(path: str, *, question_field: str = "question", answer_field: str = "answer",
            extra_fields: Sequence[str] | None = None, on_bad: str = "warn") -> datasets.Dataset:
    """Load a JSON / JSONL / parquet QA file as a ``datasets.Dataset`` (columns ``question``, ``answer``, extras)."""
    rows, _ = read_records(path, on_bad=on_bad)
    return records_to_qa(rows, os.fspath(path), question_field=question_field, answer_field=answer_field,
                         extra_fields=extra_fields)


def list_splits(folder: str) -> list[str]:
    """Split names (file stems) of the data files in a TOFU-layout folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.splitext(f)[0] for f in os.listdir(folder)
                  if f.endswith(_DATA_EXTS) and f != "idontknow.jsonl")  # refusal answers (alternates.IDK_FILE)


def split_path(folder: str, split: str) -> str:
    """The file of ``split`` in ``folder`` (``.json``, ``.jsonl`` or ``.parquet``), or a clear error."""
    for ext in _DATA_EXTS:
        p = os.path.join(folder, split + ext)
        if os.path.isfile(p):
            return p
    if not os.path.isdir(folder):
        raise DataFileNotFoundError(folder, "data folder not found")
    raise DataFileNotFoundError(os.path.join(folder, split + ".json"),
                                f"split '{split}' not found; the folder holds: {', '.join(list_splits(folder)) or 'nothing'}")


def load_tofu(source: str, split: str, *, question_field: str = "question", answer_field: str = "answer",
              extra_fields: Sequence[str] | None = None, on_bad: str = "warn") -> datasets.Dataset:
    """Load one split (``"forget10"``, ``"retain90"``, ``"forget10_perturbed"``, ...) of a TOFU-layout source.

    ``source`` is a local folder (the real TOFU JSON Lines files or a synthetic corpus) or, when no such
    folder exists, a hub id like ``locuslab/TOFU`` (config = split name; needs a network).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        return load_qa(split_path(source, split), question_field=question_field, answer_field=answer_field,
                       extra_fields=extra_fields, on_bad=on_bad)
    if _looks_like_hub_id(source):
        ds = datasets.load_dataset(source, split, split="train")  # hub: network required
        rows = ds.to_list()
        if not rows:
            _warn_report(ReadReport(f"{source}:{split}"), on_bad)
        return records_to_qa(rows, f"{source}:{split}", question_field=question_field,
                             answer_field=answer_field, extra_fields=extra_fields)
    raise DataFileNotFoundError(source, f"data folder not found (relative to {os.getcwd()}; a hub id is only tried "
                                        "for the form owner/name when no local folder 'owner' exists)")


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` and nothing local about it: a missing relative path such as ``data/tofu`` (``data`` exists
    here) or ``./tofu`` is a missing folder, not a hub id (no network retries for a typo)."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not os.path.isabs(source)
            and not os.path.exists(parts[0]) and not source.endswith(_DATA_EXTS + (".txt",)))


def find_overlap(forget: datasets.Dataset | Sequence[dict], retain: datasets.Dataset | Sequence[dict],
                 keys: Sequence[str] = ("question", "answer"), *, warn: bool = True) -> list[int]:
    """Indices of forget rows whose ``keys`` also occur in a retain row; warns with the count."""
    def key(r):
        return tuple(r[k] for k in keys)
    seen = {key(r) for r in retain}
    shared = [i for i, r in enumerate(forget) if key(r) in seen]
    if shared and warn:
        warnings.warn(f"forget and retain share {len(shared)} example(s) (forget rows {_lines(shared)})",
                      DataWarning, stacklevel=2)
    return shared


# ---------------------------------------------------------------- raw text (MUSE style)

def load_text(path: str, *, text_field: str = "text", on_bad: str = "warn") -> list[str]:
    """Documents of a raw-text file: a ``.txt`` file is one document (non-UTF-8 lines dropped and counted);
    JSON / JSONL / parquet give one document per row (``text_field``) or per string of a JSON array."""
    _check_on_bad(on_bad)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileNotFoundError(path, "file not found")
    if path.endswith(".txt"):
        rep = ReadReport(path)
        kept = []
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    kept.append(line.decode("utf-8"))
                except UnicodeDecodeError:
                    rep.bad_utf8_lines.append(lineno)
        text = "".join(kept)
        rep.rows = 1 if text.strip() else 0
        _warn_report(rep, on_bad)
        return [text] if rep.rows else []
    rows, _ = read_records(path, on_bad=on_bad)
    docs = []
    for i, r in enumerate(rows):
        if isinstance(r, str):
            docs.append(r)
            continue
        if not isinstance(r, dict):
            raise DataError(path, f"expected a string or an object, got {type(r).__name__}", row=i)
        if not isinstance(r.get(text_field), str):
            raise DataError(path, f"missing or not a string (row has fields {sorted(r)})", field=text_field, row=i)
        docs.append(r[text_field])
    return docs


def load_muse(folder: str, splits: Sequence[str] = ("forget", "retain", "holdout"), *, text_field: str = "text",
              on_bad: str = "warn") -> dict[str, list[str]]:
    """MUSE-style raw-text splits: ``{name: documents}`` from ``folder/<name>.txt|.json|.jsonl|.parquet``."""
    out = {}
    for name in splits:
        for ext in (".txt",) + _DATA_EXTS:
            p = os.path.join(folder, name + ext)
            if os.path.isfile(p):
                out[name] = load_text(p, text_field=text_field, on_bad=on_bad)
                break
        else:
            raise DataFileNotFoundError(os.path.join(folder, name + ".txt"),
                                        f"split '{name}' not found (.txt/.json/.jsonl/.parquet)")
    return out
