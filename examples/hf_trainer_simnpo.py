"""SimNPO with the plain HF Trainer, in < 1 minute on a CPU (no downloads).

    python examples/hf_trainer_simnpo.py [--out /tmp/hf_simnpo] [--objective idk_dpo --beta 0.1]

1. writes a small synthetic TOFU-layout corpus and trains a BPE tokenizer on it;
2. builds a tiny Llama and teaches it the corpus with the ordinary HF Trainer (patched: fused NLL, no logits);
3. unlearns forget10 with ``UnlearningTrainer`` (SimNPO + retain NLL; ``--objective``: any registered method,
   e.g. ``npo`` or ``idk_dpo``, whose reference log-likelihoods are cached first and, for IdkDPO, whose forget
   questions are paired with the corpus's refusals) and prints the forget / retain (/ refusal) log-likelihood
   before and after.

On a real model only step 3 matters: ``patch(model)`` and ``UnlearningTrainer(...)`` are the whole integration,
and they work under ``accelerate launch`` / DeepSpeed / FSDP because the loss runs inside the LM head's forward.
"""
import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from simnpo_fast import data as D
from simnpo_fast.hf import ForgetRetainCollator, UnlearningTrainer, add_reference_logps
from simnpo_fast.methods import get_method, method_names
from simnpo_fast.model import patch


class _Plain(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


@torch.no_grad()
def mean_loglik(model, ds, col):
    tot, n = 0.0, 0
    for s in range(0, len(ds), 16):
        b = col.pad([ds[i] for i in range(s, min(len(ds), s + 16))])
        k = int((b["labels"][:, 1:] != -100).sum())
        tot += float(model(**b).loss) * k
        n += k
    return -tot / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/simnpo_hf_example")
    ap.add_argument("--objective", default="simnpo", choices=method_names())
    ap.add_argument("--beta", type=float, default=None, help="default: 2.5 for simnpo, else the method's own")
    a = ap.parse_args()
    method = get_method(a.objective)
    torch.manual_seed(0)
    data_dir = os.path.join(a.out, "data")
    D.synthetic.generate(data_dir, n_authors=20, facts_per_author=10, seed=0)
    tok = D.train_tokenizer(data_dir, os.path.join(a.out, "tokenizer"), vocab_size=1024)
    enc = {s: D.encode_qa(D.load_tofu(data_dir, s), tok, max_length=128) for s in ("full", "forget10", "retain90")}
    col = D.DataCollator.from_tokenizer(tok)

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    patch(model)  # model(..., labels=) now returns the fused loss, logits=None
    common = dict(report_to=[], use_cpu=True, save_strategy="no", logging_steps=25, remove_unused_columns=False,
                  dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=TrainingArguments(os.path.join(a.out, "finetune"), num_train_epochs=15,
                                                per_device_train_batch_size=20, learning_rate=5e-3,
                                                lr_scheduler_type="cosine", **common),
            train_dataset=_Plain(enc["full"]), data_collator=col).train()
    train = D.ForgetRetainDataset(enc["forget10"], enc["retain90"], seed=0)
    if method.alternate != "none":  # every forget question with a refusal of data/idontknow.jsonl, drawn per epoch
        train = D.load_forget_retain(data_dir, tok, "forget10", max_length=128, idk=True)
        enc["refusals"] = train.alternates  # every (question, refusal) pair
    if method.reference == "logp":  # the model before unlearning scores every row once (no reference model kept)
        train = add_reference_logps(train, model, col)
    before = {s: mean_loglik(model, enc[s], col) for s in enc if s != "full"}

    trainer = UnlearningTrainer(
        model=model, args=TrainingArguments(os.path.join(a.out, "unlearn"), num_train_epochs=6,
                                            per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                            learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=1.0,
                                            **common),
        train_dataset=train, data_collator=ForgetRetainCollator(col), objective=a.objective,
        beta=2.5 if a.beta is None and a.objective == "simnpo" else a.beta, gamma=0.0,
        forget_weight=1.0, retain_weight=1.0)
    trainer.train()
    after = {s: mean_loglik(model, enc[s], col) for s in before}
    for s in before:
        print(f"{s:9s} mean log-likelihood per answer token: {before[s]:.3f} -> {after[s]:.3f}")
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    tok.save_pretrained(os.path.join(a.out, "model"))


if __name__ == "__main__":
    main()
