"""A realistic synthetic LM-head batch (hidden states, LM-head weight, labels) for demos, benchmarks and tests
(not random-label noise).

Random labels give every token log p ~ -log V, which no trained model produces and which makes the
SimNPO weights degenerate (sigmoid ~ 0). Here the labels are *sampled from the model's own softmax*,
with the logit scale chosen so the mean token log-likelihood is a few nats, like a fine-tuned LM on
its training data. Sampling runs in row chunks, so even this set-up never holds [N, V] logits.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def lm_batch(B: int, T: int, d: int, V: int, *, dtype=torch.float32, prompt_frac: float = 0.25,
             logit_scale: float = 8.0, seed: int = 0, chunk: int = 256):
    """Return ``(hidden [B, T, d], weight [V, d], labels [B, T])`` in ``dtype``, labels HF-aligned."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g)
    W = torch.randn(V, d, generator=g) * (logit_scale / d**0.5)
    flat = h[:, :-1].reshape(-1, d)
    nxt = torch.empty(flat.shape[0], dtype=torch.long)
    for r0 in range(0, flat.shape[0], chunk):
        p = torch.softmax(flat[r0 : r0 + chunk] @ W.T, dim=-1)
        nxt[r0 : r0 + chunk] = torch.multinomial(p, 1, generator=g).squeeze(1)
    labels = torch.empty(B, T, dtype=torch.long)
    labels[:, 0] = -100
    labels[:, 1:] = nxt.view(B, T - 1)
    labels[:, : max(1, int(T * prompt_frac))] = -100
    return h.to(dtype), W.to(dtype), labels
