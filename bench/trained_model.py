"""A small Llama trained by the project itself, cached: the realistic hidden states and LM head of the filtering
benchmarks (random weights give flat softmaxes and no sparsity).

    python -m bench.trained_model                 # build (or reuse) and print where it is cached
    python -m bench.trained_model --steps 60      # a cheaper model (another cache entry)

Corpus: the TOFU question-answer pairs (``--tofu DIR``, default ``$SIMNPO_FAST_TOFU_DIR`` or ../shared/data/tofu
when present: its ``full`` split, 4000 pairs), else the project's synthetic TOFU-layout corpus
(``simnpo_fast.data.synthetic``), each pair written ``"Question: q\\nAnswer: a<eos>"``. Tokenizer: a byte-level
BPE trained on that text without the pre-split at word boundaries (merges may span words, as in SentencePiece
with ``split_by_whitespace=False``), so that a ~1 MB corpus fills a 32000-token vocabulary; the vocabulary it
reaches is recorded (``vocab_size``). Model: Llama, d=512, 2 layers, 8 heads, FFN 1408, untied head, trained
from scratch on 128-token windows of the packed token stream (AdamW, cosine schedule, the fused NLL of
``simnpo_fast`` as its loss), 5% of the pairs held out. Everything lands in
``runs/bench-cache/trained-<key>/`` (git-ignored), ``key`` a hash of corpus, tokenizer and training settings;
an entry is used only when its ``meta.json`` (written last) is there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from bench.harness import ROOT, machine_info

CACHE = ROOT / "runs" / "bench-cache"
MODEL = dict(d=512, layers=2, heads=8, ffn=1408, window=128)


def default_tofu() -> str | None:
    for cand in (os.environ.get("SIMNPO_FAST_TOFU_DIR"), str(ROOT.parent / "shared" / "data" / "tofu")):
        if cand and os.path.exists(os.path.join(cand, "full.json")):
            return cand
    return None


def corpus_pairs(tofu: str | None, work: Path) -> tuple[list[tuple[str, str]], str, str]:
    """``([(question, answer), ...], description, folder)``: the ``full`` split of TOFU or of the synthetic
    corpus (generated into ``work``)."""
    from simnpo_fast.data import synthetic
    from simnpo_fast.data.formats import read_records

    if tofu is None:
        src = work / "synthetic"
        if not (src / "full.json").exists():
            synthetic.generate(str(src), n_authors=400, facts_per_author=20, seed=0)
        folder, desc = str(src), "synthetic (simnpo_fast.data.synthetic, 400 authors x 20 facts, seed 0)"
    else:
        folder, desc = tofu, f"TOFU ({tofu})"
    rows, _ = read_records(os.path.join(folder, "full.json"))
    pairs = [(r["question"], r["answer"]) for r in rows]
    return pairs, desc, folder


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE without the word-boundary pre-split (module docstring), specials ``<|pad|>``,
    ``<|bos|>``, ``<|eos|>`` (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from simnpo_fast.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                  max_token_length=24)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def text_of(q: str, a: str) -> str:
    return f"Question: {q}\nAnswer: {a}"


def token_stream(tok, pairs) -> "torch.Tensor":
    import torch

    ids = []
    for q, a in pairs:
        ids += tok(text_of(q, a), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.int64)


def make_model(V: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=MODEL["d"], intermediate_size=MODEL["ffn"],
                      num_hidden_layers=MODEL["layers"], num_attention_heads=MODEL["heads"],
                      num_key_value_heads=MODEL["heads"], max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def window_loss(model, ids) -> "torch.Tensor":
    """Mean next-token NLL of ``ids [B, T]`` through the fused head (no logits)."""
    import simnpo_fast as sf

    hidden = model.model(input_ids=ids).last_hidden_state
    return sf.nll_loss(hidden, model.lm_head.weight, ids)


def train(model, stream, args, log) -> list[dict]:
    """AdamW on random 128-token windows of ``stream``: linear warm-up, cosine to 10%; returns the loss log."""
    import torch

    T, B = MODEL["window"], args.batch
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    hist, t0 = [], time.time()
    for step in range(args.steps):
        frac = step / max(1, args.steps - 1)
        lr = args.lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, stream.numel() - T, (B,), generator=g)
        ids = torch.stack([stream[s : s + T] for s in starts.tolist()])
        loss = window_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append({"step": step, "loss": float(loss), "lr": lr, "s": time.time() - t0})
        if step % 10 == 0 or step == args.steps - 1:
            log(f"step {step:4d}  loss {float(loss):.3f}  {time.time() - t0:6.0f} s")
    return hist


def heldout_loss(model, stream) -> float:
    import torch

    T = MODEL["window"]
    n = (stream.numel() // T) * T
    wins = stream[:n].view(-1, T)[:64]
    with torch.no_grad():
        return float(window_loss(model, wins))


def cache_key(pairs, args) -> str:
    h = hashlib.sha256(json.dumps([pairs, args.vocab, args.steps, args.batch, args.lr, args.seed, MODEL]).encode())
    return h.hexdigest()[:12]


def build(args, log=print) -> Path:
    """Build (or find) the cached model; returns its folder."""
    import torch

    CACHE.mkdir(parents=True, exist_ok=True)
    from simnpo_fast.data.tokenizer import corpus_texts

    pairs, desc, src = corpus_pairs(args.tofu, CACHE)
    tok_texts = corpus_texts(src)
    folder = CACHE / f"trained-{cache_key([pairs, tok_texts], args)}"
    if (folder / "meta.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = build_tokenizer(tok_texts, args.vocab)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_held = len(pairs) // 20
    held, kept = [pairs[i] for i in order[:n_held]], [pairs[i] for i in order[n_held:]]
    stream, held_stream = token_stream(tok, kept), token_stream(tok, held)
    log(f"corpus {desc}: {len(pairs)} pairs, {stream.numel()} training tokens, vocabulary {len(tok)} "
        f"({time.time() - t0:.0f} s)")
    model = make_model(len(tok))
    hist = train(model, stream, args, log)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "tokenizer")
    torch.save({"train": stream, "heldout": held_stream}, folder / "streams.pt")
    meta = {"corpus": desc, "pairs": len(pairs), "train_tokens": int(stream.numel()), "vocab_size": len(tok),
            "model": MODEL, "settings": {k: getattr(args, k) for k in ("vocab", "steps", "batch", "lr", "seed")},
            "final_train_loss": sum(h["loss"] for h in hist[-10:]) / min(10, len(hist)),
            "heldout_loss": heldout_loss(model, held_stream), "build_s": time.time() - t0, "history": hist,
            "machine": machine_info()}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def load(folder: Path):
    """``(model (eval mode), tokenizer, streams, meta)`` of a cached entry."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(folder / "model").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    return model, tok, torch.load(folder / "streams.pt"), json.loads((folder / "meta.json").read_text())


def hidden_batch(folder: Path, n_seqs: int = 8, T: int = 256, split: str = "train"):
    """``(hidden [n_seqs, T, d] fp32, W [V, d] fp32, labels [n_seqs, T])``: the trained model's final hidden
    states on consecutive ``T``-token windows of its training (or held-out) stream, labels = the tokens."""
    import torch

    model, _, streams, _ = load(folder)
    ids = streams[split][: n_seqs * T].view(n_seqs, T)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    return hidden.float(), model.lm_head.weight.detach().float().clone(), ids.clone()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tofu", default=default_tofu(), help="TOFU folder (default: found, else the synthetic corpus)")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic corpus even when TOFU is present")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=16, help="128-token windows per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.synthetic:
        args.tofu = None
    return args


def main(argv=None) -> int:
    args = parse(argv)
    folder = build(args)
    meta = json.loads((folder / "meta.json").read_text())
    print(f"{folder}: vocabulary {meta['vocab_size']}, train loss {meta['final_train_loss']:.3f}, held-out loss "
          f"{meta['heldout_loss']:.3f} nats/token, built in {meta['build_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
