"""HF drop-in: patch() equals HF's own loss (value and gradients) without logits; UnlearningTrainer's loss and
gradients equal a naive full-logits SimNPO / NPO + retain NLL; a short Trainer run works (accelerate, CPU)."""
import copy

import pytest
import torch
import torch.nn.functional as F


def _close(got, want, name, tol=2e-5):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert scale > 0 and err <= tol * scale, f"{name}: max error {err} vs max |grad| {scale}"


def _tiny(vocab, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def qa(corpus):
    from simnpo_fast import data as D

    tok = D.load_tokenizer(corpus["tokenizer"])
    forget = D.encode_qa(D.load_tofu(corpus["data"], "forget10"), tok, max_length=96)
    retain = D.encode_qa(D.load_tofu(corpus["data"], "retain90"), tok, max_length=96)
    return tok, forget, retain


@pytest.mark.parametrize("tied", [False, True])
def test_patch_matches_hf_loss_and_gradients(qa, tied):
    from simnpo_fast import data as D
    from simnpo_fast.model import patch

    tok, forget, retain = qa
    col = D.DataCollator.from_tokenizer(tok)
    b = col.pad([retain[i] for i in range(6)])
    ref = _tiny(len(tok), tied)
    mine = patch(copy.deepcopy(ref))
    out_ref = ref(**b)
    out = mine(**b)
    assert out.logits is None  # no [B, T, V] tensor
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), mine.named_parameters()):
        _close(q.grad, p.grad, n)
    # without labels: unchanged logits (generation path)
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)


def _naive(model, fb, rb, objective, beta, gamma, fw, rw, ref_logp=None):
    logits = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits.float()
    tgt = fb["labels"][:, 1:]
    m = tgt != -100
    lp = (torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0] * m).sum(1)
    if objective == "simnpo":
        f = -(2 / beta) * F.logsigmoid(-beta * lp / m.sum(1) - gamma)
    else:
        f = -(2 / beta) * F.logsigmoid(-beta * (lp - ref_logp))
    return fw * f.mean() + rw * model(**rb).loss


@pytest.mark.parametrize("objective", ["simnpo", "npo"])
def test_unlearning_trainer_compute_loss_matches_naive(qa, tmp_path, objective):
    from transformers import TrainingArguments

    from simnpo_fast import data as D
    from simnpo_fast.hf import ForgetRetainCollator, UnlearningTrainer, add_reference_logps

    tok, forget, retain = qa
    base = _tiny(len(tok))
    naive_model = copy.deepcopy(base)
    ds = D.ForgetRetainDataset(forget, retain, seed=0)
    col = ForgetRetainCollator.from_tokenizer(tok)
    beta = 2.5 if objective == "simnpo" else 0.5
    if objective == "npo":
        ds = add_reference_logps(ds, base, col.collator)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, report_to=[], use_cpu=True, remove_unused_columns=False,
                             logging_steps=1, save_strategy="no", dataloader_num_workers=0)
    tr = UnlearningTrainer(model=base, args=args, train_dataset=ds, data_collator=col, objective=objective,
                           beta=beta, gamma=0.3 if objective == "simnpo" else 0.0, retain_weight=0.8)
    batch = col([ds[i] for i in range(4)])
    loss = tr.compute_loss(base, batch)
    loss.backward()
    ref_logp = batch.get("ref_logp_sum")
    nl = _naive(naive_model, batch["forget"], batch["retain"], objective, beta,
                0.3 if objective == "simnpo" else 0.0, 1.0, 0.8, ref_logp)
    nl.backward()
    torch.testing.assert_close(loss, nl, rtol=1e-5, atol=1e-6, check_dtype=False)  # nl: fp64 with NPO's fp64 cache
    for (n, p), (_, q) in zip(naive_model.named_parameters(), base.named_parameters()):
        _close(q.grad, p.grad, n)
    base.zero_grad(set_to_none=True)
    # a short real Trainer run (accelerate under the hood)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    res = tr.train()
    assert res.global_step == 3 and torch.isfinite(torch.tensor(res.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in base.named_parameters())


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("objective", ["simnpo", "graddiff"])
def test_unlearning_trainer_gradient_accumulation_equals_full_batch(qa, tmp_path, objective, normalize):
    """2 micro-batches of 2 accumulate to the gradient of one batch of 4 (exact global normalisation: forget
    sequences / tokens and retain tokens -- or sequences, ``normalize="sequence"`` -- of the whole step), not to
    a mean of two per-micro-batch means."""
    from transformers import TrainerCallback, TrainingArguments

    from simnpo_fast import data as D
    from simnpo_fast.hf import ForgetRetainCollator, UnlearningTrainer

    tok, forget, retain = qa
    col = ForgetRetainCollator.from_tokenizer(tok)
    ds = D.ForgetRetainDataset(forget, retain, seed=0)

    def step_grads(bs, accum):
        model = _tiny(len(tok))
        grads = {}

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                if not grads:
                    grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

        args = TrainingArguments(output_dir=str(tmp_path / f"{bs}x{accum}"), per_device_train_batch_size=bs,
                                 gradient_accumulation_steps=accum, max_steps=1, learning_rate=1e-3,
                                 report_to=[], use_cpu=True, remove_unused_columns=False, save_strategy="no",
                                 dataloader_num_workers=0, seed=3, max_grad_norm=0.0)
        tr = UnlearningTrainer(model=model, args=args, train_dataset=ds, data_collator=col, objective=objective,
                               retain_weight=0.7, callbacks=[Grab()], normalize=normalize)
        tr.train()
        return grads

    full, acc = step_grads(4, 1), step_grads(2, 2)
    assert full and set(full) == set(acc)
    for n in full:
        _close(acc[n], full[n], n, tol=1e-5)


def test_step_counts_follow_the_objective_denominator(qa, tmp_path):
    from transformers import TrainingArguments

    from simnpo_fast import data as D
    from simnpo_fast.hf import ForgetRetainCollator, UnlearningTrainer

    tok, forget, retain = qa
    col = ForgetRetainCollator.from_tokenizer(tok)
    ds = D.ForgetRetainDataset(forget, retain, seed=0)
    batches = [col([ds[i] for i in range(0, 3)]), col([ds[i] for i in range(3, 5)])]
    batches[1]["forget"]["labels"][0, :] = -100  # a forget sequence without answer tokens
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    f_tok = sum(int((b["forget"]["labels"][:, 1:] != -100).sum()) for b in batches)
    r_tok = sum(int((b["retain"]["labels"][:, 1:] != -100).sum()) for b in batches)
    for objective, want_f in (("simnpo", 4.0), ("graddiff", float(f_tok))):
        tr = UnlearningTrainer(model=_tiny(len(tok)), args=args, train_dataset=ds, data_collator=col,
                               objective=objective)
        assert tr.step_counts(batches) == {"forget": want_f, "retain": float(r_tok)}


def test_from_preset_takes_the_papers_values(qa, tmp_path):
    """Issue 23: the HF drop-in's defaults are the library's (beta 2.5, weights 1); from_preset gives the paper
    setting's loss and schedule, as the trainer config's preset (read from the same YAML), keywords winning."""
    from simnpo_fast import data as D
    from simnpo_fast.hf import ForgetRetainCollator, UnlearningTrainer
    from simnpo_fast.train import load_config

    tok, forget, retain = qa
    ds = D.ForgetRetainDataset(forget, retain, seed=0)
    col = ForgetRetainCollator.from_tokenizer(tok)
    tr = UnlearningTrainer.from_preset("tofu_forget10", model=_tiny(len(tok)), train_dataset=ds, data_collator=col,
                                       output_dir=str(tmp_path / "p"))
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    cfg = load_config("tofu_forget10", [f"model.path={tmp_path / 'm'}", f"data.path={tmp_path / 'd'}"])
    c, a = tr.criterion, tr.args
    assert (c.objective, c.forget_objective.beta, c.forget_weight, c.retain_weight, c.normalize) == \
        (cfg.loss.objective, cfg.loss.beta, cfg.loss.forget_weight, cfg.loss.retain_weight, cfg.loss.normalize)
    assert (a.learning_rate, a.weight_decay, a.max_grad_norm, a.warmup_steps, a.max_steps, a.seed) == \
        (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm, cfg.optim.warmup_steps, cfg.max_steps,
         cfg.seed)
    assert getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type) == "linear" and cfg.optim.warmup_from_zero
    assert a.per_device_train_batch_size * a.gradient_accumulation_steps == cfg.batch_size
    again = UnlearningTrainer.from_preset("tofu_forget10", model=_tiny(len(tok)), train_dataset=ds,
                                          data_collator=col, output_dir=str(tmp_path / "q"), beta=3.0)
    assert again.criterion.forget_objective.beta == 3.0 and again.criterion.forget_weight == 0.125
    with pytest.raises(ValueError, match="unknown preset 'tofu_forget11'"):
        UnlearningTrainer.from_preset("tofu_forget11", model=_tiny(len(tok)))
