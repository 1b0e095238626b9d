"""``train_step`` on a :class:`StepContext` built directly (no run, no config, no process group, as the benchmarks
build it): one optimizer step over two micro-batches equals an oracle written here -- the HF model's full logits,
SimNPO + retain NLL by hand in fp64, normalised by the whole step's counts, ``clip_grad_norm_`` and plain SGD."""
import copy

import pytest
import torch
import torch.nn.functional as F

BETA, GAMMA, W_F, W_R, LR, CLIP = 2.5, 0.3, 0.5, 1.0, 0.1, 0.05


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(cfg).double()


def _rows(n, T, seed, prompt=2):
    """``n`` right-padded rows of up to ``T`` tokens, the first ``prompt`` tokens and the padding masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, T), generator=g)
    lengths = torch.randint(prompt + 2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :prompt] = -100
    return ids * mask, mask, labels


def _batch(seed, T):
    from simnpo_fast.batch import ForgetRetainBatch

    f, r = _rows(2, T, seed), _rows(3, T, seed + 100)
    return ForgetRetainBatch(*(torch.cat([a, b]) for a, b in zip(f, r)), n_forget=2)


def _oracle_loss(model, batches):
    """``W_F * mean_i SimNPO_i + W_R * retain token-mean NLL`` over every row of every micro-batch."""
    s, n, forget = [], [], []
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        y = b.labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
        s.append(lp.sum(1))
        n.append((y != -100).sum(1).double())
        forget.append(torch.arange(b.n_rows) < b.n_forget)
    s, n, forget = torch.cat(s), torch.cat(n), torch.cat(forget)
    f = -(2 / BETA) * F.logsigmoid(-(BETA / n[forget]) * s[forget] - GAMMA)
    return W_F * f.mean() + W_R * (-s[~forget].sum() / n[~forget].sum())


@pytest.mark.parametrize("scheduler", [False, True])
def test_train_step_on_a_bare_context_equals_the_oracle(scheduler):
    from simnpo_fast.criterion import UnlearningCriterion
    from simnpo_fast.model import UnlearnModel
    from simnpo_fast.train import StepContext, train_step

    hf = _model()
    oracle = copy.deepcopy(hf)
    model = UnlearnModel(hf)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s) if scheduler else None
    crit = UnlearningCriterion("simnpo", beta=BETA, gamma=GAMMA, forget_weight=W_F, retain_weight=W_R)
    ctx = StepContext(model=model, criterion=crit, optimizer=opt, scheduler=sched, max_grad_norm=CLIP)
    batches = [_batch(1, 9), _batch(2, 12)]
    rec = train_step(ctx, batches)

    want = _oracle_loss(oracle, batches)
    want.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(oracle.parameters(), CLIP)
    with torch.no_grad():
        for p in oracle.parameters():
            p -= LR * p.grad
    want_loss = float(want.detach())
    assert abs(rec.loss - want_loss) <= 1e-10 * abs(want_loss)
    assert abs(rec.grad_norm - float(gnorm)) <= 1e-10 * float(gnorm) and float(gnorm) > CLIP  # clipping ran
    assert (ctx.step, rec.step, rec.epoch, rec.lr) == (1, 1, 0, LR)
    assert rec.tokens == sum(int(b.attention_mask.sum()) for b in batches)
    got, ref = dict(hf.named_parameters()), dict(oracle.named_parameters())
    for name, p in ref.items():
        torch.testing.assert_close(got[name], p, rtol=1e-10, atol=1e-12, msg=name)
    assert all(p.grad is None for p in model.parameters())  # dropped after the update
    if scheduler:
        assert opt.param_groups[0]["lr"] == LR * 0.5
