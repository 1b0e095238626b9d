"""`simnpo-fast eval` and `simnpo-fast relearn`.

    simnpo-fast eval --model runs/x/hf --data ../shared/data/tofu --reference eval/retain-tofu/eval.json
    torchrun --nproc_per_node 2 -m simnpo_fast.cli eval --model ... --data ...     # sharded, same numbers
    simnpo-fast eval --task muse --model ... --data muse_bench/data/bbc --corpus news [--sets privleak]
    simnpo-fast eval --task muse --model ... --data ... --retrain-auc 0.4772 | eval/retrain-muse/eval.json
    simnpo-fast eval --task mcq --model ... --data wmdp-bio.parquet [--subject auto] [--mcq-format letters|text]
    simnpo-fast relearn --model runs/x/hf --data ... --n-examples 20 --steps 10 --reference ...

Each writes ``<out>/eval.json`` (or ``relearn.json``), ``summary.md`` and ``metrics.png`` (rank 0) and prints
the table; ``<out>`` defaults to ``eval/<model folder name>-<task>/`` (``-relearn`` for relearn) under the current
folder, a new ``-2``, ``-3``, ... when that one holds a report. Options of another task are refused. The
tokenizer is read from the model folder unless ``--tokenizer`` is given.

TOFU protocols (``--protocol``, recorded in the JSON): ``tofu`` (default; locuslab/tofu: first 300 questions of
each set, candidates cut at 200 tokens, greedy generation up to 200 tokens in total) or ``open-unlearning`` (all
questions, 512 tokens, 200 new tokens). ``--max-new-tokens`` / ``--max-length`` / ``--max-examples`` override
the protocol. MUSE: the files of the selected ``--sets`` are checked before the model is loaded;
``--max-new-tokens`` sets the VerbMem and KnowMem budgets (default 128 / 32, MUSE's). MCQ (WMDP / MMLU,
lm-evaluation-harness's zero-shot log-likelihood protocol): ``--data`` is a question file (JSON, JSONL, parquet)
or a folder of them; ``--max-length`` is lm-eval's context limit (default: the model's), ``--sets`` picks files.
"""
from __future__ import annotations

import argparse
import os


#: eval options that belong to some tasks only (argparse dest -> tasks): given with another ``--task`` they are
#: refused, never silently ignored
TASK_ONLY = {
    "forget_split": ("tofu",), "template": ("tofu",), "protocol": ("tofu",), "no_generation": ("tofu",),
    "truth_ratio_mean": ("tofu",), "reference": ("tofu",), "max_new_tokens": ("tofu", "muse"),
    "corpus": ("muse",), "retrain_auc": ("muse",), "muse_file": ("muse",), "max_text_tokens": ("muse",),
    "mcq_format": ("mcq",), "subject": ("mcq",),
}
#: the defaults of the task-specific options (filled in after the check, so an option given is told apart)
DEFAULTS = {"forget_split": "forget10", "protocol": "tofu", "truth_ratio_mean": "geometric",
            "mcq_format": "letters", "subject": "auto"}


def _common(p):
    p.add_argument("--model", required=True, help="a local HF model folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--data", required=True, help="TOFU-layout folder (the MUSE corpus folder; MCQ: a question file "
                                                 "or folder)")
    p.add_argument("--out", default=None,
                   help="report folder (default eval/<model folder name>-<task>/ under the current folder, a new "
                        "one (-2, -3, ...) when that one holds a report)")
    p.add_argument("--forget-split", default=None,
                   help="TOFU: the forget split whose <split>_perturbed file is the forget set (default forget10)")
    p.add_argument("--template", default=None,
                   help="TOFU prompt template (plain, llama2, phi, zephyr, chat); default: the protocol's, tofu: "
                        "llama2 (phi for a Phi model), as locuslab/tofu's config/model_config.yaml; "
                        "open-unlearning: the tokenizer's chat template, else plain")
    p.add_argument("--protocol", choices=("tofu", "open-unlearning"), default=None,
                   help="TOFU protocol (default tofu): tofu (300 questions per set, 200 tokens in total) or "
                        "open-unlearning (all questions, 200 new tokens)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: the protocol's; MUSE: VerbMem 128 and KnowMem 32)")
    p.add_argument("--max-length", type=int, default=None,
                   help="TOFU candidate length cap (default: the protocol's); MCQ: lm-eval's context limit")
    p.add_argument("--max-examples", type=int, default=None,
                   help="first N questions of each set (default: the protocol's; TOFU 300)")
    p.add_argument("--no-generation", action="store_true", help="TOFU: skip generation (no ROUGE)")
    p.add_argument("--truth-ratio-mean", choices=("geometric", "arithmetic"), default=None,
                   help="TOFU truth ratio (default geometric): geometric mean of the perturbed probabilities "
                        "(reference code) or the paper's arithmetic mean")
    p.add_argument("--reference", default=None,
                   help="TOFU: the retain-only model's eval JSON (forget quality); checked before the model loads")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (model loading included)")


def add_parsers(sub) -> None:
    """Register ``eval`` and ``relearn``."""
    add_eval_parser(sub)
    add_relearn_parser(sub)


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="TOFU, MUSE or multiple-choice (WMDP / MMLU) metrics of a model (JSON + "
                                    "Markdown + PNG)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--task", choices=("tofu", "muse", "mcq"), default="tofu",
                   help="tofu (default), muse, or mcq (multiple choice: WMDP / MMLU)")
    p.add_argument("--sets", "--subsets", nargs="*", default=None,
                   help="TOFU sets (forget retain real_authors world_facts) or MUSE subsets (verbmem_forget "
                        "knowmem_forget knowmem_retain privleak)")
    p.add_argument("--corpus", choices=("news", "books"), default=None,
                   help="MUSE corpus: picks AUC_retrain of MUSE's constants.py (0.4772 / 0.5393); default: from "
                        "the folder name")
    p.add_argument("--retrain-auc", default=None,
                   help="MUSE: the retrained model's Min-40%% AUC (a number, news, books, or its eval JSON)")
    p.add_argument("--muse-file", action="append", default=[], metavar="ROLE=PATH",
                   help="MUSE: take a file from PATH (roles: verbmem_forget, knowmem_forget, knowmem_forget_icl, "
                        "knowmem_retain, knowmem_retain_icl, privleak_forget, privleak_holdout)")
    p.add_argument("--max-text-tokens", type=int, default=None,
                   help="MUSE, memory only: cut VerbMem prompts to their last N tokens and PrivLeak texts to their "
                        "first N (MUSE uses the whole texts; the numbers then differ from MUSE's)")
    p.add_argument("--mcq-format", choices=("letters", "text"), default=None,
                   help="MCQ (default letters): letters (WMDP / MMLU templates: ' A'..' D' after 'Answer:') or "
                        "text (MMLU continuation template: the choice texts)")
    p.add_argument("--subject", default=None,
                   help="MCQ (default auto) description 'The following are multiple choice questions (with "
                        "answers) about SUBJECT.': auto (a row's MMLU subject, or bio / cyber / chem in the file "
                        "name), none, or the subject")
    p.set_defaults(func=run_eval)
    return p


def add_relearn_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("relearn", help="relearning attack: NLL on a seeded forget subset, forget metrics before/after")
    _common(p)
    p.add_argument("--n-examples", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--relearn-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_relearn)
    return p


def _task_options(args, task: str) -> None:
    """Refuse the options of :data:`TASK_ONLY` given for another task; then fill in :data:`DEFAULTS`."""
    from ..errors import ConfigError

    given = [k for k, tasks in TASK_ONLY.items()
             if task not in tasks and getattr(args, k, None) not in (None, False, [])]
    if given:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"{names}: not an option of --task {task} (it would be ignored); see "
                          f"simnpo-fast eval --help")
    for k, v in DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def _check_reference(args) -> None:
    """``--reference`` read and checked (a TOFU evaluation JSON with per-candidate numbers) before any model work."""
    from ..errors import ConfigError, ConfigPathError
    from ..eval.tofu import reference_truth_ratios

    if args.reference is None:
        return
    if not os.path.isfile(args.reference):
        raise ConfigPathError(f"--reference {args.reference!r}: no such file (relative to {os.getcwd()})")
    try:
        reference_truth_ratios(args.reference, args.truth_ratio_mean)
    except Exception as e:  # noqa: BLE001 - unreadable, not JSON, not a TOFU result, too old
        raise ConfigError(f"--reference {args.reference!r}: not a usable TOFU evaluation: {type(e).__name__}: "
                          f"{e}") from None


def _tofu_template(args, model) -> None:
    """No ``--template``: the protocol's reference prompt format (``tofu``: locuslab/tofu's llama2 format, phi
    for a Phi model; ``open-unlearning``: the library default, the tokenizer's chat template or plain)."""
    if args.template is None and args.protocol == "tofu":
        kind = str(getattr(getattr(model, "config", None), "model_type", "")).lower()
        args.template = "phi" if kind.startswith("phi") else "llama2"


def _out_dir(args, task: str) -> str:
    """``--out``, or ``eval/<model folder name>-<task>`` under the current folder (never inside the model
    folder), suffixed ``-2``, ``-3``, ... when that folder already holds a report."""
    if args.out:
        return args.out
    base = os.path.join("eval", f"{os.path.basename(os.path.normpath(os.path.abspath(args.model)))}-{task}")
    out, n = base, 1
    while os.path.isdir(out) and os.listdir(out):
        n += 1
        out = f"{base}-{n}"
    return out


def _check_args(args) -> None:
    """Command-line values that cannot run: a ConfigError (exit 2) naming the option, before any work."""
    import math

    from ..errors import ConfigError

    _task_options(args, getattr(args, "task", "tofu"))

    for opt, v, lo in (("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                       ("--max-length", args.max_length, 2), ("--max-examples", args.max_examples, 1),
                       ("--n-examples", getattr(args, "n_examples", None), 1),
                       ("--steps", getattr(args, "steps", None), 1),
                       ("--relearn-batch-size", getattr(args, "relearn_batch_size", None), 1)):
        if v is not None and v < lo:
            raise ConfigError(f"{opt} must be >= {lo}, got {v}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr must be a finite number > 0, got {lr}")


def _require_folder(args, data_folder: bool = True) -> None:
    """``--data`` (a folder unless ``data_folder`` is False: a file is fine), ``--model`` and ``--tokenizer`` are
    local paths (never hub ids: nothing is downloaded); a missing one is the error of its kind (exit 4 / 5 / 6,
    as in ``unlearn``), before any model work."""
    from ..errors import DataPathError, ModelPathError, TokenizerPathError

    if not (os.path.isdir(args.data) if data_folder else os.path.exists(args.data)):
        raise DataPathError(f"{args.data}: data folder not found (relative to {os.getcwd()}; local folders only)")
    if not os.path.isdir(args.model):
        raise ModelPathError(f"--model {args.model!r}: not a local model folder (relative to {os.getcwd()})")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        raise TokenizerPathError(f"{args.tokenizer}: tokenizer folder not found (relative to {os.getcwd()})")


def _setup(args):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if args.no_progress:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar

    from ..data import load_tokenizer
    from ..distributed import init_distributed
    from ..errors import ModelError

    dev = args.device
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: the sets are sharded over the ranks
        dev = init_distributed(args.device, timeout_s=1800).device
    elif dev == "auto":
        dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers / safetensors raise many types
        raise ModelError(f"--model {args.model!r}: cannot load the model: {type(e).__name__}: {e}") from e
    model = model.to(dev)
    model.eval()
    tok = load_tokenizer(args.tokenizer or args.model)
    return model, tok


def _tofu_cfg(args, sets=None):
    from ..eval.tofu import SETS, TofuEvalConfig

    return TofuEvalConfig(forget_split=args.forget_split, sets=tuple(sets or SETS), protocol=args.protocol,
                          batch_size=args.batch_size, gen_batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, max_length=args.max_length, template=args.template,
                          max_examples=args.max_examples, truth_ratio_mean=args.truth_ratio_mean,
                          generation=not args.no_generation)


def _checked_tofu_cfg(args, sets):
    """The TOFU config of the command line, every value checked (ConfigError, exit 2) before any model work."""
    from ..errors import ConfigError
    from ..eval.tofu import SETS

    unknown = sorted(set(sets or ()) - set(SETS))
    if unknown:
        raise ConfigError(f"--sets: unknown TOFU set(s) {unknown}; choose from {' '.join(SETS)}")
    cfg = _tofu_cfg(args, sets)
    try:
        cfg.resolved()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_reference(args)
    return cfg


def _muse_cfg(args):
    from ..errors import ConfigError
    from ..eval.muse import FILE_CANDIDATES, MUSE_SUBSETS, MuseEvalConfig

    files = {}
    for spec in args.muse_file:
        role, sep, path = spec.partition("=")
        if not sep or role.strip() not in FILE_CANDIDATES:
            raise ConfigError(f"--muse-file {spec!r}: expected ROLE=PATH with ROLE in {sorted(FILE_CANDIDATES)}")
        files[role.strip()] = path
    if args.max_text_tokens is not None and args.max_text_tokens < 2:
        raise ConfigError(f"--max-text-tokens must be >= 2, got {args.max_text_tokens}")
    cfg = MuseEvalConfig(subsets=tuple(args.sets or MUSE_SUBSETS), batch_size=args.batch_size,
                         max_examples=args.max_examples, corpus=args.corpus, files=files,
                         max_prompt_tokens=args.max_text_tokens, privleak_max_tokens=args.max_text_tokens)
    if args.max_new_tokens is not None:
        cfg.verbmem_max_new_tokens = cfg.knowmem_max_new_tokens = int(args.max_new_tokens)
    return cfg


def _notes(res: dict) -> str:
    """How to read the numbers (printed and written under the table)."""
    if res.get("task") == "mcq":
        return ("Multiple-choice accuracy with lm-evaluation-harness's zero-shot log-likelihood protocol "
                f"({res['protocol']['format']}): acc = the highest-likelihood choice is the answer; acc_norm divides "
                "by the choice's length in characters. Chance is 1 / number of choices (0.25 for WMDP / MMLU).")
    if res.get("task") == "muse":
        pl = res.get("privleak", {})
        return ("MUSE metrics as swj0419/muse_bench computes them: VerbMem / KnowMem = mean ROUGE-L F1 (MUSE's tables "
                "show x100). PrivLeak = (AUC - AUC_retrain) / AUC_retrain * 100 with AUC_retrain = "
                f"{pl.get('retrain_auc', 'n/a')}: close to 0 is good; about -100 = the forget texts still look "
                "memorised (under-unlearned); large positive = over-unlearned.")
    return (f"TOFU metrics as locuslab/tofu computes them, protocol {res.get('protocol')!r} "
            f"({res['config']['resolved']['source']}): truth ratio R = geometric mean of the perturbed answers' "
            "probabilities over the paraphrased one's; forget TR min(R,1/R) is TOFU's forget statistic (1 = "
            "forgotten); forget quality = KS p-value vs the retain model (high is good).")


def _rank0() -> bool:
    from ..distributed import rank

    return rank() == 0


def run_eval(args) -> int:
    from ..errors import check_finite
    from ..eval.result_files import text_table, write_report

    _check_args(args)
    progress = not args.no_progress
    if args.task == "tofu":
        from ..eval.tofu import evaluate_tofu

        _require_folder(args)
        cfg = _checked_tofu_cfg(args, args.sets)  # protocol, sets, --reference: before the model is loaded
        model, tok = _setup(args)
        _tofu_template(args, model)
        cfg.template = args.template
        res = evaluate_tofu(model, tok, args.data, cfg, reference=args.reference, progress=progress)
    elif args.task == "mcq":
        from ..eval.mcq import McqEvalConfig, evaluate_mcq, load_mcq

        cfg = McqEvalConfig(format=args.mcq_format, subject=None if args.subject == "none" else args.subject,
                            sets=args.sets or None, batch_size=args.batch_size, max_examples=args.max_examples,
                            max_length=args.max_length)
        data = load_mcq(args.data, cfg)  # every file checked before the model is loaded
        _require_folder(args, data_folder=False)
        model, tok = _setup(args)
        res = evaluate_mcq(model, tok, args.data, cfg, data=data, progress=progress)
    else:
        from ..eval.muse import evaluate_muse, load_muse_files, read_retrain_auc

        cfg = _muse_cfg(args)
        data = load_muse_files(args.data, cfg)  # every file checked before any model work
        read_retrain_auc(args.retrain_auc)
        _require_folder(args)
        model, tok = _setup(args)
        res = evaluate_muse(model, tok, args.data, cfg, retrain_auc=args.retrain_auc, data=data, progress=progress)
    check_finite(res["summary"], f"{args.task} evaluation of {args.model}")
    res["model"] = os.path.abspath(args.model)
    out = _out_dir(args, args.task)
    if _rank0():
        notes = _notes(res)
        paths = write_report({"eval": res}, out, title=f"{args.task} evaluation of {args.model}", notes=notes)
        print(text_table({os.path.basename(os.path.normpath(args.model)): res["summary"]}))
        print(f"\n{notes}\nwritten: {paths['eval']}, {paths['markdown']}, {paths['plot']}")
    return 0


def run_relearn(args) -> int:
    from ..errors import check_finite
    from ..eval.relearn import RelearnConfig, relearn_attack
    from ..eval.result_files import save_json, text_table, write_report

    _check_args(args)
    _require_folder(args)
    eval_cfg = _checked_tofu_cfg(args, args.sets if hasattr(args, "sets") else ("forget",))
    model, tok = _setup(args)
    _tofu_template(args, model)
    eval_cfg.template = args.template
    rc = RelearnConfig(n_examples=args.n_examples, steps=args.steps, lr=args.lr,
                       batch_size=args.relearn_batch_size, seed=args.seed,
                       max_length=args.max_length if args.max_length is not None else RelearnConfig.max_length,
                       template=args.template)
    res = relearn_attack(model, tok, args.data, rc, eval_cfg=eval_cfg, reference=args.reference, in_place=True,
                         progress=not args.no_progress)
    check_finite(res["before"]["summary"], f"relearning of {args.model}: before")
    check_finite(res["after"]["summary"], f"relearning of {args.model}: after")
    out = _out_dir(args, "relearn")
    if _rank0():
        paths = write_report({"before": res["before"], "after": res["after"]}, out,
                             title=f"relearning attack ({args.n_examples} examples, {args.steps} steps)")
        save_json(res, os.path.join(out, "relearn.json"))
        print(text_table({"before relearning": res["before"]["summary"],
                          "after relearning": res["after"]["summary"]}))
        print(f"\nwritten: {os.path.join(out, 'relearn.json')}, {paths['markdown']}, {paths['plot']}")
    return 0
