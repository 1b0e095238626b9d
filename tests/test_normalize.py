"""The token-loss normalisation option (issue 23): ``normalize="token"`` (the sum over a step's answer tokens divided
by their count) and ``normalize="sequence"`` (the mean over sequences of each sequence's token mean: what the
SimNPO authors' one-row micro-batches computed, OPTML-Group/Unlearn-Simple TOFU/dataloader.py
CustomTrainerForgetting.compute_loss, whose retain term is HF's per-micro-batch token mean). Checked against an
fp64 oracle written here on the full logits, whole batch and split into micro-batches with the step's counts."""
import pytest
import torch
import torch.nn.functional as F

import simnpo_fast as sf
from simnpo_fast.batch import ForgetRetainBatch, StepCounts


def _close(a, b, tol=1e-6):
    """Gradients, relative to the largest entry: the forget rows' entries are small differences of much larger
    terms (saturated SimNPO weights), which the fused path and the oracle round in another order (fp64: ~1e-9
    of the largest entry); the two normalisations differ by ~1e-2."""
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


def _batch(B, T, d, V, seed, p_mask=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < p_mask] = -100
    y[:, : T // 4] = -100  # prompts
    for i in range(B):  # answers of very different lengths, as TOFU's (7 to 153 tokens)
        y[i, T // 4 + 2 + 3 * i:] = -100
    return h, y


def _token_logp(h, W, y):
    """Per answer token log p (shifted: hidden t predicts label t + 1) and the mask, fp64, full logits."""
    lp = torch.log_softmax(h[:, :-1] @ W.T, -1)
    tgt = y[:, 1:]
    m = tgt != -100
    return lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * m, m


def oracle_nll(h, W, y, normalize):
    tok, m = _token_logp(h, W, y)
    if normalize == "token":
        return -tok.sum() / m.sum()
    n = m.sum(1)
    keep = n > 0
    return (-tok.sum(1)[keep] / n[keep]).mean()


def oracle_kl(h, W, y, hr, Wr, normalize):
    lp = torch.log_softmax(h[:, :-1] @ W.T, -1)
    lq = torch.log_softmax(hr[:, :-1] @ Wr.T, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    m = y[:, 1:] != -100
    kl = kl * m
    if normalize == "token":
        return kl.sum() / m.sum()
    n = m.sum(1)
    keep = n > 0
    return (kl.sum(1)[keep] / n[keep]).mean()


def oracle_simnpo(h, W, y, beta, gamma):
    tok, m = _token_logp(h, W, y)
    n = m.sum(1).double()  # (an int tensor divided by a float would be fp32)
    return (-(2 / beta) * F.logsigmoid(-(beta / n) * tok.sum(1) - gamma)).mean()


def oracle_ga(h, W, y, normalize):
    return -oracle_nll(h, W, y, normalize)


@pytest.fixture
def data():
    d, V = 8, 50
    g = torch.Generator().manual_seed(7)
    W = (torch.randn(V, d, generator=g, dtype=torch.float64) / 3).requires_grad_()
    hf, yf = _batch(4, 40, d, V, seed=1)
    hr, yr = _batch(6, 40, d, V, seed=2)
    return W, hf, yf, hr, yr


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("method", ["simnpo", "graddiff"])
def test_unlearning_loss_equals_the_oracle(data, method, normalize):
    W, hf, yf, hr, yr = data
    crit = sf.UnlearningLoss(method, forget_weight=0.125, retain_weight=1.0, beta=2.5, normalize=normalize)
    out = crit(W, hf, yf, hr, yr)
    lf = oracle_simnpo(hf, W, yf, 2.5, 0.0) if method == "simnpo" else oracle_ga(hf, W, yf, normalize)
    want = 0.125 * lf + oracle_nll(hr, W, yr, normalize)
    assert torch.allclose(out.loss, want, rtol=1e-12, atol=0)
    got = torch.autograd.grad(out.loss, (W, hf, hr))
    ref = torch.autograd.grad(want, (W, hf, hr))
    for a, b in zip(got, ref):
        assert _close(a, b)


def test_the_two_normalisations_differ_on_unequal_lengths(data):
    """Not a vacuous option: with answers of unequal lengths the two retain means are different numbers."""
    W, _, _, hr, yr = data
    assert abs(float(oracle_nll(hr, W, yr, "token") - oracle_nll(hr, W, yr, "sequence"))) > 1e-3


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_retain_kl_equals_the_oracle(data, normalize):
    W, hf, yf, hr, yr = data
    g = torch.Generator().manual_seed(3)
    Wr = W.detach() + 0.1 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    href = hr.detach() + 0.1 * torch.randn(hr.shape, generator=g, dtype=torch.float64)
    got = sf.kl_loss(hr, W, yr, href, Wr, normalize=normalize)
    want = oracle_kl(hr, W, yr, href, Wr, normalize)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(got, (W, hr)), torch.autograd.grad(want, (W, hr))):
        assert _close(a, b)


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("method", ["simnpo", "graddiff"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_micro_batches_with_the_step_counts_equal_the_whole_batch(data, method, normalize, split):
    """Gradient accumulation: each micro-batch's batch_loss with the step's StepCounts, summed, is the oracle of
    the whole batch (any split, unequal micro-batches included)."""
    W, hf, yf, hr, yr = data
    crit = sf.UnlearningLoss(method, forget_weight=0.125, retain_weight=1.0, beta=2.5, normalize=normalize)
    fparts = torch.tensor_split(torch.arange(4), split)
    rparts = torch.tensor_split(torch.arange(6), split)
    batches, hiddens = [], []
    for fi, ri in zip(fparts, rparts):
        T = yf.shape[1]
        batches.append(ForgetRetainBatch(input_ids=torch.zeros(len(fi) + len(ri), T, dtype=torch.long),
                                         attention_mask=torch.ones(len(fi) + len(ri), T, dtype=torch.long),
                                         labels=torch.cat([yf[fi], yr[ri]]), n_forget=len(fi)))
        hiddens.append(torch.cat([hf[fi], hr[ri]]))
    counts = StepCounts.of(batches, crit.method, normalize=normalize)
    total = sum(crit.batch_loss(W, None, h, b, counts).loss for h, b in zip(hiddens, batches))
    lf = oracle_simnpo(hf, W, yf, 2.5, 0.0) if method == "simnpo" else oracle_ga(hf, W, yf, normalize)
    want = 0.125 * lf + oracle_nll(hr, W, yr, normalize)
    assert torch.allclose(total, want, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(total, (W, hf, hr)), torch.autograd.grad(want, (W, hf, hr))):
        assert _close(a, b)


def test_bad_normalize_is_refused():
    with pytest.raises(ValueError, match="normalize must be 'token' or 'sequence'"):
        sf.UnlearningLoss("simnpo", normalize="tokens")



@pytest.mark.parametrize("backend", ["chunked", "reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_kl_every_backend_and_dtype_against_fp64(data, backend, dtype):
    """The per-row scale of ``normalize="sequence"`` on every backend (triton delegates the KL to the chunked
    schedule), in fp32 and bf16, against the fp64 oracle on the same rounded inputs; a peaked reference (its
    logits scaled by 8) puts most of its mass on one token per row."""
    W, _, _, hr, yr = data
    g = torch.Generator().manual_seed(5)
    Wr = (W.detach() * 8 + 0.1 * torch.randn(W.shape, generator=g, dtype=torch.float64)).to(dtype)
    href = (hr.detach() + 0.1 * torch.randn(hr.shape, generator=g, dtype=torch.float64)).to(dtype)
    h, w = hr.detach().to(dtype).requires_grad_(), W.detach().to(dtype).requires_grad_()
    got = sf.kl_loss(h, w, yr, href, Wr, normalize="sequence", backend=backend)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = oracle_kl(h64, w64, yr, href.double(), Wr.double(), "sequence")
    # bf16: the GEMMs round the logits to bf16 (the token path's error too, tests/test_kl.py); fp32 tells the two
    # normalisations apart (they differ by ~1e-2)
    tol, gtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 5e-2)
    assert abs(float(got) - float(want)) <= tol * abs(float(want))
    for a, b in zip(torch.autograd.grad(got, (w, h)), torch.autograd.grad(want, (w64, h64))):
        assert a.dtype == dtype and _close(a.double(), b, gtol)
