"""A run's tokenizer and encoded datasets: the forget rows (``data.forget_split``), when the method has a
retain term or the run evaluates, the retain rows (``data.retain_split``), and for a method with alternate
answers (``alternate="idk"``) every forget question with every refusal of ``<data folder>/idontknow.jsonl``.

Inputs are never written to: a synthetic corpus is generated only into a missing or empty folder (an existing
one is reused only when its recorded parameters match), and a tokenizer is trained only into that corpus's own
``tokenizer`` folder; given ``data.tokenizer`` or ``model.path``, the tokenizer is loaded from there or the run
stops.
"""
from __future__ import annotations

import os
import shutil

import yaml

from ..distributed import DistInfo, on_rank0
from ..errors import ConfigError
from .run_lock import folder_flock
from ..methods import get_method


def uses_retain(cfg) -> bool:
    """Whether the run's loss has a retain term (its stream then pairs every forget row with a retain row)."""
    return get_method(cfg.loss.objective).retain != "none" and cfg.loss.retain_weight > 0


def synthetic_corpus(path: str, params: dict) -> bool:
    """Rank 0: make sure ``path`` holds the synthetic corpus of ``params``: generated into a missing or empty
    folder, reused when its recorded parameters match, and never written over a folder of other files. Runs
    that share a not-yet-generated folder take turns on an ``flock`` of its parent folder (the run lock's
    :func:`~simnpo_fast.train.run_lock.folder_flock`): the first generates it (into a temporary folder renamed
    into place, so a crash never leaves half a corpus), the others reuse it. Returns whether this call generated
    it."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with folder_flock(parent):
        return _synthetic_corpus(path, params)


def _synthetic_corpus(path: str, params: dict) -> bool:
    from ..data import synthetic

    meta = os.path.join(path, synthetic.META_FILE)
    if os.path.isfile(meta):
        want = {"n_authors": 200, "facts_per_author": 20, "seed": 0, "n_perturbed": 5}
        want.update(params)
        try:
            with open(meta, encoding="utf-8") as f:
                have = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{meta}: unreadable synthetic-corpus record ({e})") from None
        diff = [f"{k}: {have.get(k)!r} in the folder, {v!r} asked" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise ConfigError(f"data.path {path!r} holds a synthetic corpus made with other parameters "
                              f"({'; '.join(diff)}); choose another data.path or match data.synthetic")
        return False
    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"data.path {path!r} (data.kind=synthetic) is a folder of other files, not a generated "
                          f"corpus (no {synthetic.META_FILE}); the corpus is only generated into a new or empty "
                          "folder. For real TOFU-layout data set data.kind=tofu")
    tmp = f"{os.path.abspath(path)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    synthetic.generate(tmp, **params)
    if os.path.isdir(path):
        os.rmdir(path)  # empty (checked above)
    os.rename(tmp, path)
    return True


def _tokenizer(cfg, info: DistInfo, path: str):
    """The run's tokenizer; for a synthetic corpus rank 0 first generates the corpus and, when no tokenizer
    folder is given, trains one into ``<corpus>/tokenizer`` (the other ranks wait)."""
    from .. import data as D

    dc = cfg.data
    tok_dir = dc.tokenizer or cfg.model.path
    if dc.kind == "synthetic":
        own_tok = None if tok_dir else os.path.join(path, "tokenizer")

        def make():
            synthetic_corpus(path, dc.synthetic)
            if own_tok and not os.path.isfile(os.path.join(own_tok, "tokenizer.json")):
                D.train_tokenizer(path, own_tok, vocab_size=dc.vocab_size)

        on_rank0(make, info.is_main)
        tok_dir = tok_dir or own_tok
    if not dc.tokenizer and cfg.model.path:  # the tokenizer comes from the model folder: its config first
        from ..model import check_model_config

        check_model_config(cfg.model.path, cfg.model.trust_remote_code)
    return D.load_tokenizer(tok_dir)


def _encode(cfg, path: str, tok, splits) -> list:
    """The encoded datasets of ``splits``, in order: question-answer examples, or token windows of raw text
    (``muse``)."""
    from .. import data as D

    dc = cfg.data
    if dc.kind == "muse":
        docs = D.load_muse(path, splits=splits)
        out = [D.encode_text_windows(docs[k], tok, window=dc.window, source=k) for k in splits]
        return [_non_empty(ds, os.path.join(path, k)) for ds, k in zip(out, splits)]
    out = []
    for split in splits:
        src = f"{path}:{split}" if dc.kind != "qa" else os.path.join(path, split)
        rows = D.load_tofu(path, split) if dc.kind in ("synthetic", "tofu") else D.load_qa(os.path.join(path, split))
        ds = D.encode_qa(rows, tok, template=dc.template, max_length=dc.max_length, source=src)
        out.append(_non_empty(ds, src))
    return out


def data_folder(cfg) -> str:
    """The run's data folder: ``data.path``, or ``<output_dir>/data`` for a synthetic corpus of its own."""
    return cfg.data.path or os.path.join(cfg.output_dir, "data")


def prepare_data(cfg, info: DistInfo):
    """``(tokenizer, forget, retain)``: encoded datasets of ``data.forget_split`` and ``data.retain_split``;
    ``retain`` is None when the run needs no retain rows (no retain term, no evaluation)."""
    dc = cfg.data
    path = data_folder(cfg)
    tok = _tokenizer(cfg, info, path)
    splits = (dc.forget_split, dc.retain_split) if uses_retain(cfg) or cfg.evaluate else (dc.forget_split,)
    enc = _encode(cfg, path, tok, splits)
    return tok, enc[0], enc[1] if len(enc) > 1 else None


def prepare_alternates(cfg, tok, forget):
    """The alternate answers of the run's method for the encoded ``forget`` set
    (:class:`~simnpo_fast.data.alternates.AlternateAnswers`), or None when the method has none. ``"idk"``: every
    forget question with every refusal of ``<data folder>/idontknow.jsonl``, drawn per ``(seed, epoch)``."""
    from .. import data as D

    kind = get_method(cfg.loss.objective).alternate
    if kind == "none":
        return None
    dc = cfg.data
    if dc.kind == "muse":
        raise ConfigError(f"loss.objective={cfg.loss.objective!r} answers the forget questions with refusals: it "
                          "needs question-answer data (data.kind synthetic, tofu or qa), not muse text windows")
    path = data_folder(cfg)
    rows = D.load_tofu(path, dc.forget_split) if dc.kind in ("synthetic", "tofu") else \
        D.load_qa(os.path.join(path, dc.forget_split))
    idk = os.path.join(path, D.IDK_FILE)
    return D.encode_alternates(D.forget_questions(rows, forget), D.load_idk(idk), tok, template=dc.template,
                               max_length=dc.max_length, seed=cfg.seed, source=f"{idk} x {dc.forget_split}")


def _non_empty(ds, source: str):
    if len(ds) == 0:
        from ..data import DataError

        raise DataError(source, "no examples to train on (an empty split, or every example dropped by "
                                "data.max_length / data.window: see the warnings above)")
    return ds
