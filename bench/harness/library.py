"""The library seam: the simnpo_fast names the loss benchmarks call, imported here and nowhere else in bench/
(bench/step.py, bench/plan_validate.py and bench/data_throughput.py measure the trainer, the planner and the
data loader themselves and import those).

When the library moves a name, this file is the one place to change.
"""
from __future__ import annotations

from typing import Callable

BETA, GAMMA = 2.5, 0.0  # SimNPO hyper-parameters of every loss benchmark
IGNORE = -100  # HF's ignore index in labels
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # command-line dtype name -> torch dtype name


def simnpo(backend) -> Callable:
    """``fn(hidden [B, T, d], weight [V, d], labels [B, T]) -> scalar``: SimNPO (BETA, GAMMA), HF-aligned labels,
    mean over sequences, on ``backend`` (a backend name or instance)."""
    import simnpo_fast as sf

    return lambda h, w, lab: sf.simnpo_loss(h, w, lab, beta=BETA, gamma=GAMMA, backend=backend)


def reference_backend(dtype=None):
    """Full-logits backend: ``dtype=None`` keeps the model dtype (the naive path), ``torch.float64`` is the oracle."""
    from simnpo_fast.backends import ReferenceBackend

    return ReferenceBackend(dtype)


def chunked_backend(rows: int | None = None):
    """The CPU / cuBLAS fused backend with a fixed tile height (``None``: the backend's own rule)."""
    from simnpo_fast.backends import ChunkedBackend

    return ChunkedBackend(rows)


def lowp_gemm_report() -> dict:
    """The library's measured probe of this CPU's 16-bit GEMMs (rates, and whether the chunked backend widens
    bf16 / fp16 tiles to fp32 here: ``simnpo_fast/backends/lowp.py``)."""
    from simnpo_fast.backends.lowp import report

    return report("cpu")


def onednn_available() -> bool:
    """Whether torch runs oneDNN matmuls on CPU tensors here (``simnpo_fast/backends/gemm.py``)."""
    from simnpo_fast.backends.gemm import onednn_available as available

    return available()


def tile_gemm_report() -> dict:
    """The engine of the chunked backend's fp32 / bf16 tile products here (``simnpo_fast/backends/gemm.py``)."""
    from simnpo_fast.backends.gemm import report

    return report()


def oracle() -> Callable:
    """SimNPO computed in fp64 from full logits: the reference every method is checked against."""
    import torch

    return simnpo(reference_backend(torch.float64))


def lm_inputs(N: int, d: int, V: int, dtype, seq_len: int = 256, seed: int = 0, device: str = "cpu"):
    """``(hidden [B, T, d], weight [V, d], labels [B, T])`` with ``T = min(seq_len, N)``, ``B = max(1, N // T)``.

    Labels are sampled from the head's own softmax (a fine-tuned LM's regime, not uniform noise) and there is no
    prompt: after the HF shift every position is an answer token, ``M = B * (T - 1)`` rows.
    """
    from simnpo_fast.synthetic_batch import lm_batch

    T = min(seq_len, N)
    h, w, labels = lm_batch(max(1, N // T), T, d, V, dtype=dtype, prompt_frac=0.0, seed=seed)
    return h.to(device), w.to(device), labels.to(device)


def valid_rows(N: int, seq_len: int = 256) -> int:
    """``M`` of :func:`lm_inputs`: the answer rows that every FLOP count uses (6 M d V for fwd + bwd)."""
    T = min(seq_len, N)
    return max(1, N // T) * (T - 1)
