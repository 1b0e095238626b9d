"""Error classes and the command line's exit codes: one home for both.

Every error a user can cause is one of these classes (or :class:`simnpo_fast.data.DataError`), carries a
one-line message naming the file or config key, and maps to one exit status of ``simnpo-fast``:

====  ===============  ==================================================================================
code  class            meaning
====  ===============  ==================================================================================
0                      success
1                      unexpected error (a bug): one line, ``--debug`` prints the traceback
2     ConfigError      bad config file / override / command-line value (argparse usage errors too); a missing
                       data / model / tokenizer folder is 4 / 5 / 6 in every command
3     NonFiniteError   training or relearning diverged (non-finite loss or gradient)
4     DataError        missing / unreadable / empty data file or split (``simnpo_fast.data.DataError``)
5     ModelError       the model folder cannot be loaded, or does not fit the tokenizer
6     TokenizerError   the tokenizer folder cannot be loaded
7     RunFolderError   the run folder is busy (lock), holds another run, has nothing to resume, or
                       ``--resume`` was asked with a config that differs from the run's
8     CheckpointError  no checkpoint of the run passes verification, or a verified one cannot be loaded
9     ResultError      a non-finite or degenerate result (NaN metric, empty evaluation set)
10    Preempted        SIGTERM / SIGUSR1 stopped the run at a step boundary after a checkpoint: rerun with
                       ``--resume`` (or ``--resume=auto``) to continue (``train/preempt.py``)
11    (OSError)        storage: a file could not be written or read (disk full, quota, read-only file system,
                       permission, I/O error) outside a checkpoint (those are 8)
====  ===============  ==================================================================================

No traceback is printed unless ``--debug`` is given.
"""
from __future__ import annotations

import errno
import math
import sys
import traceback
from typing import Callable, Iterable, Mapping

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_DATA = 4
EXIT_MODEL = 5
EXIT_TOKENIZER = 6
EXIT_RUN_FOLDER = 7
EXIT_CHECKPOINT = 8
EXIT_RESULT = 9
EXIT_PREEMPTED = 10
EXIT_STORAGE = 11
#: OSError numbers that are the storage's doing, not a bug: reported as "storage error", exit 11
STORAGE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                                        "EFBIG", "ENAMETOOLONG") if hasattr(errno, n))


class SimnpoError(Exception):
    """Base of the user-facing errors; ``exit_code`` and ``kind`` drive the command line's report."""

    exit_code = EXIT_INTERNAL
    kind = "error"


class ConfigError(SimnpoError, ValueError):
    """A config value, file or command-line argument that cannot run; the message names the key or file."""

    exit_code = EXIT_CONFIG
    kind = "config error"


class ConfigPathError(ConfigError, FileNotFoundError):
    """A path given in the config does not exist."""


class DataPathError(ConfigPathError):
    """The data folder named by ``data.path`` / ``--data`` does not exist: a data error (exit 4), as in every
    command."""

    exit_code = EXIT_DATA
    kind = "data error"


class ModelPathError(ConfigPathError):
    """The model folder named by ``model.path`` / ``--model`` does not exist (exit 5)."""

    exit_code = EXIT_MODEL
    kind = "model error"


class TokenizerPathError(ConfigPathError):
    """The tokenizer folder named by ``data.tokenizer`` / ``--tokenizer`` does not exist (exit 6)."""

    exit_code = EXIT_TOKENIZER
    kind = "tokenizer error"


class NonFiniteError(SimnpoError, RuntimeError):
    """A non-finite loss or gradient norm: the run stops before the optimizer step."""

    exit_code = EXIT_NONFINITE
    kind = "diverged"


class ModelError(SimnpoError, ValueError):
    exit_code = EXIT_MODEL
    kind = "model error"


class TokenizerError(SimnpoError, ValueError):
    exit_code = EXIT_TOKENIZER
    kind = "tokenizer error"


class RunFolderError(SimnpoError, RuntimeError):
    exit_code = EXIT_RUN_FOLDER
    kind = "run folder"


class CheckpointError(SimnpoError, RuntimeError):
    exit_code = EXIT_CHECKPOINT
    kind = "checkpoint error"


class ResultError(SimnpoError, ValueError):
    exit_code = EXIT_RESULT
    kind = "bad result"


class Preempted(SimnpoError, RuntimeError):
    """The run stopped on a preemption signal after writing a checkpoint (see ``train/preempt.py``)."""

    exit_code = EXIT_PREEMPTED
    kind = "preempted"


class RankZeroError(SimnpoError):
    """On ranks > 0: the error rank 0 hit in a step only rank 0 runs (same message and exit code)."""

    def __init__(self, message: str, exit_code: int = EXIT_INTERNAL, kind: str = "error"):
        super().__init__(message)
        self.exit_code, self.kind = exit_code, kind

    def __reduce__(self):
        return (RankZeroError, (str(self), self.exit_code, self.kind))


def classify(exc: BaseException) -> tuple[int, str]:
    """``(exit code, label)`` of an exception raised by a command."""
    if isinstance(exc, SimnpoError):
        return exc.exit_code, exc.kind
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return EXIT_STORAGE, "storage error"
    data = sys.modules.get("simnpo_fast.data.formats")
    if data is not None and isinstance(exc, (data.DataError, data.DataWarning)):
        return EXIT_DATA, "data error"
    return EXIT_INTERNAL, "unexpected error"


def exception_chain(exc: BaseException):
    """``exc``, the exceptions inside torch's ``CheckpointException`` (``failures``: rank -> (exception, trace))
    and the ``__cause__`` / ``__context__`` chain of each."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for _, wrapped in sorted(failures.items(), key=lambda kv: str(kv[0])):
                inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
                if isinstance(inner, BaseException):
                    todo.append(inner)
        todo += [e.__cause__, e.__context__]


def one_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:  # torch's CheckpointException: its str holds tracebacks
        inner = list(exception_chain(exc))[1:2]
        if inner:
            ranks = ", ".join(str(r) for r in sorted(failures, key=str))
            return f"on rank(s) {ranks}: {type(inner[0]).__name__}: {one_line(inner[0])}"
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= 2000 else msg[:2000] + " ..."


def run_command(fn: Callable[[], int], *, debug: bool = False, prog: str = "simnpo-fast") -> int:
    """Run a command; a raised error becomes one line on stderr (a traceback only with ``debug``) and its exit
    code (see the module table)."""
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - the last line of defence (torch's CheckpointException is a
        #                                    BaseException, not an Exception)
        code, label = classify(e)
        if debug:
            traceback.print_exc()
        hint = ""
        if code == EXIT_INTERNAL:
            label = f"{label} ({type(e).__name__})"
            hint = "" if debug else " [rerun with --debug for the traceback]"
        print(f"{prog}: {label}: {one_line(e)}{hint}", file=sys.stderr, flush=True)
        return code


def pop_debug_flag(argv: Iterable[str]) -> tuple[list[str], bool]:
    """``--debug`` may appear anywhere before a ``--``: remove it and report whether it was there."""
    argv = list(argv)
    stop = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:stop]
    return [a for i, a in enumerate(argv) if not (i < stop and a == "--debug")], debug


def warn(message: str) -> None:
    """A one-line warning on stderr, ``simnpo-fast: <message>`` (the command line's own voice)."""
    print(f"simnpo-fast: {message}", file=sys.stderr, flush=True)


def check_finite(values: Mapping[str, object], what: str) -> None:
    """Raise :class:`ResultError` naming every non-finite number of a flat ``{name: value}`` mapping."""
    bad = [f"{k}={v}" for k, v in values.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(float(v))]
    if bad:
        raise ResultError(f"{what}: non-finite metric(s) {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} "
                          "(an empty evaluation set or a diverged model gives no number)")
