"""The WMDP setting, offline: the synthetic corpus's stand-in (no downloads, CPU, a few minutes).

    python examples/wmdp_standin.py [--out runs/wmdp-standin] [--results docs/results]

1. generates the fictitious-author corpus (40 authors x 10 facts) with its WMDP stand-in
   (``<corpus>/wmdp/``: raw-text biographies, forget / retain multiple-choice questions) and its BPE tokenizer;
2. finetunes a tiny Llama from scratch on every biography and every question's answer line (the facts as text
   and as answers: ``wmdp/corpora/finetune.jsonl``; the ``finetune`` stage of the trainer);
3. unlearns the forget10 authors' biographies with the packaged ``wmdp`` config (SimNPO on whole text windows +
   retain NLL on the other authors' biographies), overriding only what a tiny model on a CPU needs (model, data
   paths, float32, lr 1e-3, 40 steps of 4 + 4 windows, 4 warmup steps); once with the config's beta 0.1 (the
   paper's WMDP value) and once with beta 1;
4. evaluates forget- and retain-author questions before and after with ``simnpo_fast.eval.mcq`` in both of
   lm-evaluation-harness's formats (letters: the WMDP / MMLU template; text: MMLU's continuation template), and
   writes ``wmdp-standin.{json,md,png}`` into ``--results``.
"""
import argparse
import json
import os
import time

import torch

MODEL = "{hidden_size: 128, intermediate_size: 352, num_hidden_layers: 2, num_attention_heads: 4, " \
        "num_key_value_heads: 2}"
#: row name -> (run folder, overrides of the wmdp config); the first run also finetunes
RUNS = {"SimNPO beta 0.1 (config)": ("simnpo-beta0.1", []), "SimNPO beta 1": ("simnpo-beta1", ["loss.beta=1.0"])}


def _base(out, corpus):
    return [f"data.path={corpus}/wmdp/corpora", f"data.tokenizer={corpus}/tokenizer", "data.forget_split=forget",
            "data.retain_split=retain", "data.finetune_split=finetune", "data.window=256", "model.dtype=float32",
            "parallel.activation_checkpointing=false", "checkpoint.every=0", "progress=false", "max_steps=40",
            "batch_size=4", "micro_batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=4"]


def _evaluate(hf_dir, tok, corpus):
    from transformers import AutoModelForCausalLM

    from simnpo_fast.eval.mcq import McqEvalConfig, evaluate_mcq

    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    out = {}
    for fmt in ("text", "letters"):
        res = evaluate_mcq(model, tok, f"{corpus}/wmdp/questions", McqEvalConfig(format=fmt, subject=None))
        for name, s in res["sets"].items():
            out[f"{name}/{fmt}/acc"] = s["acc"]
            out[f"{name}/{fmt}/acc_norm"] = s["acc_norm"]
        out["n_questions"] = {name: s["n"] for name, s in res["sets"].items()}
    return out


def _write(results, path_stem):
    from simnpo_fast.eval.result_files import bar_chart, markdown_table
    from simnpo_fast.train.metrics import machine_info

    cols = [(f"{s}/{f}/acc", f"{s} acc ({f})") for f in ("text", "letters") for s in ("forget", "retain")]
    rows = {name: r["mcq"] for name, r in results["models"].items()}
    bar_chart(rows, path_stem + ".png", columns=cols, title="WMDP stand-in: multiple-choice accuracy (chance 0.25)")
    results["machine"] = machine_info()
    with open(path_stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    n = next(iter(results["models"].values()))["mcq"]["n_questions"]
    m = results["machine"]
    lines = ["# WMDP stand-in (synthetic authors)", "",
             f"`{results['command']}` ({results['seconds']:.0f} s on {m.get('cpu', 'this CPU')}, "
             f"{m.get('cores', '?')} cores, shared; seed {results['seed']}). {results['setting']}. "
             f"{n['forget']} forget and {n['retain']} retain questions, chance 0.25. Accuracy with "
             "lm-evaluation-harness's zero-shot multiple-choice protocol (`simnpo_fast.eval.mcq`): *text* = the "
             "choice texts as continuations (MMLU continuation template), *letters* = ' A'..' D' after the lettered "
             "choices (WMDP / MMLU template; this model never saw lettered choices, so it stays at chance: a 7B "
             "chat model reads them, a tiny model trained from scratch does not).", "",
             markdown_table(rows, cols), "",
             "Forget / retain log-likelihood per token of the biographies (trainer's evaluation):", ""]
    for name, r in results["models"].items():
        ll = r.get("loglik")
        if ll:
            lines.append(f"* {name}: forget {ll['forget_loglik']:.3f}, retain {ll['retain_loglik']:.3f}")
    lines += ["", f"![accuracy]({os.path.basename(path_stem)}.png)", ""]
    with open(path_stem + ".md", "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/wmdp-standin")
    ap.add_argument("--results", default="docs/results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from simnpo_fast.data import load_tokenizer, synthetic, train_tokenizer
    from simnpo_fast.train.config_io import load_config
    from simnpo_fast.train.stages import train

    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    corpus = os.path.join(out, "data")
    if not os.path.isdir(corpus):
        synthetic.generate(corpus, n_authors=40, facts_per_author=10, seed=args.seed)
        train_tokenizer(corpus, os.path.join(corpus, "tokenizer"), vocab_size=1024)
    tok = load_tokenizer(os.path.join(corpus, "tokenizer"))
    results = {"setting": "finetune a tiny Llama on 40 synthetic biographies and the answer lines of every "
                          "question, unlearn the 4 forget authors' biographies (raw text only) with the wmdp config; "
                          "questions: 4 choices, distractors stated in other authors' biographies",
               "command": "python examples/wmdp_standin.py", "seed": args.seed, "models": {}}
    ft = ["model.preset=tiny-llama", f"model.config={MODEL}", "finetune.enabled=true", "finetune.epochs=30",
          "finetune.lr=3e-3", "finetune.batch_size=32", "finetune.micro_batch_size=32", "finetune.schedule=cosine"]
    first = True
    finetuned = os.path.join(out, next(iter(RUNS.values()))[0], "finetune", "hf")
    for name, (folder, extra) in RUNS.items():
        run_dir = os.path.join(out, folder)
        model = ft if first else [f"model.path={finetuned}"]
        cfg = load_config("wmdp", _base(out, corpus) + model + extra + [f"output_dir={run_dir}", f"seed={args.seed}"])
        res = train(cfg, overwrite=True)
        if first:
            results["models"]["finetuned (before)"] = {"mcq": _evaluate(finetuned, tok, corpus),
                                                       "loglik": res.eval_before}
            first = False
        results["models"][name] = {"mcq": _evaluate(res.hf_dir, tok, corpus), "loglik": res.eval_after,
                                   "steps": res.steps, "overrides": extra}
        print(name, json.dumps(results["models"][name]["mcq"]), flush=True)
    results["seconds"] = time.perf_counter() - t0
    os.makedirs(args.results, exist_ok=True)
    _write(results, os.path.join(args.results, "wmdp-standin"))
    print(f"written: {os.path.join(args.results, 'wmdp-standin')}.{{json,md,png}} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
