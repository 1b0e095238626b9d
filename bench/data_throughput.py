"""Loader throughput: examples/s to tokenise + collate TOFU ``full`` (4000 QA pairs).

    python -m bench.data_throughput [--tofu DIR] [--batch-size 32] [--repeats 5]

The tokenizer is the project's byte-level BPE (4096 tokens) trained on the same folder, so no download is
needed. Without ``--tofu`` (and without ``SIMNPO_FAST_TOFU_DIR``) the embedded synthetic corpus (200 authors x
20 facts, the same 4000-row shape) is generated in a temporary folder and measured instead. Timings are
medians over ``--repeats`` runs, single process; results go to
``<--out or bench/results>/data_throughput-<machine>-<date>.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench.harness import median_time, result_header, write_result


def measure(data_dir: str, batch_size: int, max_length: int, repeats: int) -> dict:
    """Tokenizer training, loading, tokenising and collating ``full`` (plain and length-bucketed batches), and
    one epoch of the paired forget10 / retain90 loader, in the folder ``data_dir``."""
    import torch

    from simnpo_fast.data import (DataCollator, ForgetRetainDataset, ShardedBatchSampler, encode_qa, load_tofu,
                                  train_tokenizer)

    t0 = time.perf_counter()
    tok = train_tokenizer(data_dir, None, vocab_size=4096, files=["full"])
    t_train = time.perf_counter() - t0
    t_load, _ = median_time(lambda: load_tofu(data_dir, "full"), repeats)
    full = load_tofu(data_dir, "full")
    n = len(full)
    t_tok, _ = median_time(lambda: encode_qa(full, tok, max_length=max_length), repeats)
    enc = encode_qa(full, tok, max_length=max_length)
    col = DataCollator.from_tokenizer(tok)

    def collate_all(lengths):
        real = padded = 0
        for idx in ShardedBatchSampler(n, batch_size, seed=0, lengths=lengths):
            b = col([enc[i] for i in idx])
            real += int(b["attention_mask"].sum())
            padded += b["input_ids"].numel()
        return real, padded

    t_col, _ = median_time(lambda: collate_all(None), repeats)
    t_col_b, _ = median_time(lambda: collate_all(enc.lengths), repeats)
    real, padded = collate_all(None)
    real_b, padded_b = collate_all(enc.lengths)
    forget = encode_qa(load_tofu(data_dir, "forget10"), tok)
    retain = encode_qa(load_tofu(data_dir, "retain90"), tok)

    def paired_epoch():
        ds = ForgetRetainDataset(forget, retain, seed=0)
        s = ShardedBatchSampler(len(ds), batch_size, seed=0, lengths=forget.lengths)
        for _ in torch.utils.data.DataLoader(ds, batch_sampler=s, collate_fn=col):
            pass

    t_pair, _ = median_time(paired_epoch, repeats)
    return {
        "rows": n, "batch_size": batch_size, "max_length": max_length, "repeats": repeats, "vocab_size": len(tok),
        "tokenizer_train_s": round(t_train, 4), "load_full_s": round(t_load, 4),
        "tokenise_s": round(t_tok, 4), "tokenise_examples_per_s": round(n / t_tok),
        "collate_s": round(t_col, 4), "collate_examples_per_s": round(n / t_col),
        "collate_bucketed_s": round(t_col_b, 4),
        "tokenise_plus_collate_examples_per_s": round(n / (t_tok + t_col)),
        "tokenise_plus_collate_bucketed_examples_per_s": round(n / (t_tok + t_col_b)),
        "padding_fraction": round(1 - real / padded, 4), "padding_fraction_bucketed": round(1 - real_b / padded_b, 4),
        "paired_forget10_retain90_epoch_s": round(t_pair, 4),
        "paired_pairs_per_s": round(len(forget) / t_pair),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tofu", default=os.environ.get("SIMNPO_FAST_TOFU_DIR", ""), help="TOFU JSONL folder")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.tofu and os.path.isfile(os.path.join(args.tofu, "full.json")):
            data_dir, corpus = args.tofu, "tofu"
        else:
            from simnpo_fast.data import synthetic

            data_dir, corpus = tmp, "synthetic-200x20"
            synthetic.generate(data_dir, n_authors=200, facts_per_author=20, seed=0)
        res = {**result_header("data_throughput", "bench.data_throughput", argv), "corpus": corpus,
               **measure(data_dir, args.batch_size, args.max_length, args.repeats)}
    print(f"{corpus} full ({res['rows']} rows), batch {args.batch_size}: tokenise {res['tokenise_examples_per_s']} "
          f"ex/s, collate {res['collate_examples_per_s']} ex/s, tokenise+collate "
          f"{res['tokenise_plus_collate_examples_per_s']} ex/s (bucketed "
          f"{res['tokenise_plus_collate_bucketed_examples_per_s']} ex/s); padding "
          f"{res['padding_fraction']:.1%} -> {res['padding_fraction_bucketed']:.1%} with bucketing; "
          f"paired loader {res['paired_pairs_per_s']} pairs/s")
    if not args.no_write:
        print(f"wrote {write_result('data_throughput', res, args.out)}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
