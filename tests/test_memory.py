"""The chunked path never allocates a [tokens, V]-sized tensor (forward or backward)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import simnpo_fast as sf
from simnpo_fast.backends import ChunkedBackend, chunk_rows


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _inputs(B=16, T=128, d=64, V=3001):
    h = torch.randn(B, T, d, requires_grad=True)
    W = (torch.randn(V, d) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[:, :10] = -100
    return h, W, labels


def run(fn, backend):
    h, W, labels = _inputs()
    with LargestTensor() as probe:
        loss = fn(h, W, labels, backend)
        loss.backward()
    return probe, h.shape[0] * h.shape[1], W.shape


FNS = {
    "simnpo": lambda h, W, y, be: sf.simnpo_loss(h, W, y, backend=be),
    "nll": lambda h, W, y, be: sf.nll_loss(h, W, y, backend=be),
    "seq_logprob_recompute": lambda h, W, y, be: sf.sequence_logprob(h, W, y, backend=be)[0].square().mean(),
    "simnpo_none": lambda h, W, y, be: sf.simnpo_loss(h, W, y, reduction="none", backend=be).sum(),
}


@pytest.mark.parametrize("name", list(FNS))
def test_chunked_never_holds_tokens_x_vocab(name):
    probe, N, (V, d) = run(FNS[name], "chunked")
    R = chunk_rows(d)
    # the largest tensor is one logits tile [R, V] or the LM-head gradient [V, d] -- never [N, V]
    assert probe.largest <= max(R * V, V * d), (probe.largest, probe.op)
    assert probe.largest < N * V / 8


def test_probe_sees_the_naive_logits():
    """The same probe on the reference backend does see an [N, V] tensor (so the test above can fail)."""
    probe, N, (V, d) = run(FNS["simnpo"], "reference")
    assert probe.largest >= 0.9 * N * V


def test_long_sequences_stay_in_tiles():
    h = torch.randn(1, 1000, 64, requires_grad=True)
    W = (torch.randn(2001, 64) * 0.1).requires_grad_()
    y = torch.randint(0, 2001, (1, 1000))
    with LargestTensor() as probe:
        sf.simnpo_loss(h, W, y, backend=ChunkedBackend(chunk_rows=100)).backward()
    assert probe.largest <= 100 * 2001


class HiddenSized(TorchDispatchMode):
    """Records the distinct storages of op outputs ``[*, d]`` of at least ``min_numel`` elements (``[V, d]``
    excluded), other than the ``known`` storages (the inputs)."""

    def __init__(self, d, V, min_numel, known=()):
        super().__init__()
        self.d, self.V, self.min_numel = d, V, min_numel
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.d and t.shape[0] != self.V
                    and t.numel() >= self.min_numel):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.known:
                    self.seen.setdefault(ptr, (str(func), tuple(t.shape)))
        return out


def _hidden_copies(backend):
    h, W, labels = _inputs()
    B, T, d = h.shape
    M = int((labels[:, 1:] != -100).sum())  # packed rows after the shift
    with HiddenSized(d, W.shape[0], M * d // 2, known=(h,)) as probe:
        sf.simnpo_loss(h, W, labels, backend=backend).backward()
    return list(probe.seen.values()), (B * T, d)


def test_chunked_makes_no_copy_of_the_hidden_states():
    """Memory beyond the gradients does not grow with the token count: the only [tokens, d] buffer that the
    chunked path allocates is the hidden-state gradient itself (rows are gathered one tile at a time)."""
    seen, grad_shape = _hidden_copies("chunked")
    assert [s for _, s in seen] == [grad_shape], seen


def test_probe_sees_the_packed_copy_of_a_materialising_backend():
    seen, _ = _hidden_copies("reference")
    assert len(seen) >= 2, seen  # packed rows [M, d] + the scattered gradient
