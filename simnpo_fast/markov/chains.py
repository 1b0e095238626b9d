"""The data of the SimNPO paper's synthetic study: a mixture of three Markov chains (retain, forget1, forget2).

Protocol of OPTML-Group/Unlearn-Simple, ``synthetic/data_generation.py`` (``prepare_datasets``,
``generate_sequences``) and ``synthetic/utils.py`` (``OneHotDataset``), re-implemented here:

* ``S`` states. With ``k = S // 3`` the states ``[0, k)``, ``[k, 2k)`` and ``[2k, 3k)`` are the *blocks* of the
  retain, forget1 and forget2 chains (with ``S = 10`` state 9 belongs to no block: it is reached by leakage only).
* Transition matrix of a chain with block ``B``: from a state ``s`` in ``B``, probability ``(1 - leak) / k`` to
  each state of ``B`` and ``leak / (S - k)`` to each other state; from a state outside ``B`` the uniform
  distribution ``1 / S`` (the reference fills such a row with ``leak / (S - k)`` and normalises it).
* Initial distribution: ``(1 - leak) / k`` on ``B`` and ``leak / (S - k)`` elsewhere (sums to 1).
* Every sequence of a chain has the chain's fixed length; a fraction ``test_frac`` (reference: 0.2) is held out.
* The targets are all transitions ``s_t -> s_{t+1}``: the first state is input only (``OneHotDataset``: input
  ``seq[:-1]``, labels ``seq[1:]``). :func:`batch` gives HF-aligned labels (position 0 masked; the fused losses
  shift), so a sequence of length ``L`` has ``L - 1`` targets.

The sampler is ours (inverse-CDF on numpy's PCG64); each chain draws from its own seeded stream
``default_rng([seed, chain index])``, so the retain data of a seed is the same in every setting of the study.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..data.collate import DataCollator
from ..errors import ConfigError

CHAINS = ("retain", "forget1", "forget2")


def block(name: str, n_states: int) -> List[int]:
    """The states a chain prefers: the ``CHAINS.index(name)``-th block of ``n_states // 3`` states."""
    if name not in CHAINS:
        raise ConfigError(f"unknown chain {name!r}; choose one of {CHAINS}")
    if n_states < 3:
        raise ConfigError(f"n_states must be >= 3 (three disjoint blocks), got {n_states}")
    k = n_states // 3
    i = CHAINS.index(name)
    return list(range(i * k, (i + 1) * k))


def _check_leakage(leakage: float) -> float:
    leakage = float(leakage)
    if not 0.0 < leakage < 1.0:
        raise ConfigError(f"leakage must be in (0, 1), got {leakage}")
    return leakage


def transition_matrix(name: str, n_states: int, leakage: float) -> np.ndarray:
    """``[S, S]`` row-stochastic matrix of chain ``name`` (fp64; every entry > 0)."""
    leakage = _check_leakage(leakage)
    b = block(name, n_states)
    k = len(b)
    T = np.full((n_states, n_states), 1.0 / n_states)
    for s in b:
        T[s, :] = leakage / (n_states - k)
        T[s, b] = (1.0 - leakage) / k
    return T


def initial_distribution(name: str, n_states: int, leakage: float) -> np.ndarray:
    """``[S]`` distribution of the first state of chain ``name``."""
    leakage = _check_leakage(leakage)
    b = block(name, n_states)
    pi = np.full(n_states, leakage / (n_states - len(b)))
    pi[b] = (1.0 - leakage) / len(b)
    return pi / pi.sum()


def sample(T: np.ndarray, pi: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, length]`` int64 state sequences: ``s_0 ~ pi``, ``s_{t+1} ~ T[s_t]`` (inverse CDF, vectorised)."""
    if length < 2:
        raise ConfigError(f"sequence length must be >= 2 (one transition at least), got {length}")
    cdf = np.cumsum(T, axis=1)
    cdf[:, -1] = 1.0  # guard against round-off: u < 1 always finds a state
    out = np.empty((n, length), dtype=np.int64)
    out[:, 0] = np.searchsorted(np.cumsum(pi), rng.random(n), side="right").clip(max=len(pi) - 1)
    for t in range(1, length):
        u = rng.random(n)[:, None]
        out[:, t] = (cdf[out[:, t - 1]] <= u).sum(axis=1)
    return out


def transition_counts(seqs: np.ndarray, n_states: int) -> np.ndarray:
    """``[S, S]`` counts of the transitions ``s_t -> s_{t+1}`` in ``seqs [n, L]``."""
    src, dst = seqs[:, :-1].reshape(-1), seqs[:, 1:].reshape(-1)
    return np.bincount(src * n_states + dst, minlength=n_states * n_states).reshape(n_states, n_states)


def transition_chi2(seqs: np.ndarray, T: np.ndarray, min_expected: float = 5.0) -> dict:
    """Pearson's goodness-of-fit of the observed transitions of ``seqs`` to ``T``: the statistic summed over the
    rows whose smallest expected count is at least ``min_expected`` (``S - 1`` degrees of freedom each) and
    its p-value. A generator that samples ``T`` gives p-values uniform on (0, 1)."""
    from scipy.stats import chi2

    counts = transition_counts(seqs, T.shape[0]).astype(np.float64)
    n_row = counts.sum(axis=1)
    stat, dof, rows = 0.0, 0, 0
    for s in range(T.shape[0]):
        expected = n_row[s] * T[s]
        if expected.min() < min_expected:
            continue
        stat += float(((counts[s] - expected) ** 2 / expected).sum())
        dof += T.shape[0] - 1
        rows += 1
    p = float(chi2.sf(stat, dof)) if dof else float("nan")
    return {"chi2": stat, "dof": dof, "rows": rows, "p_value": p}


@dataclass
class ChainData:
    """One chain's matrices and its train / held-out test sequences (``[n, length]`` int64)."""

    name: str
    T: np.ndarray
    pi: np.ndarray
    train: np.ndarray
    test: np.ndarray

    @property
    def length(self) -> int:
        return int(self.train.shape[1])


def make_chain(name: str, *, seed: int, n: int, length: int, n_states: int, leakage: float,
               test_frac: float = 0.2) -> ChainData:
    """``n`` sequences of chain ``name`` from the stream ``default_rng([seed, chain index])``; the last
    ``round(test_frac * n)`` are the test split (the sequences are i.i.d., so no shuffle is needed)."""
    if not 0.0 < test_frac < 1.0:
        raise ConfigError(f"test_frac must be in (0, 1), got {test_frac}")
    n_test = int(round(test_frac * n))
    if n_test < 1 or n - n_test < 1:
        raise ConfigError(f"{name}: n={n} with test_frac={test_frac} leaves an empty train or test split")
    T = transition_matrix(name, n_states, leakage)
    pi = initial_distribution(name, n_states, leakage)
    seqs = sample(T, pi, n, length, np.random.default_rng([int(seed), CHAINS.index(name)]))
    return ChainData(name, T, pi, seqs[: n - n_test], seqs[n - n_test:])


def make_data(*, seed: int, n_states: int, leakage: float, test_frac: float, sizes: Dict[str, int],
              lengths: Dict[str, int]) -> Dict[str, ChainData]:
    """The three chains of one setting: ``{"retain": ChainData, "forget1": ..., "forget2": ...}``."""
    return {c: make_chain(c, seed=seed, n=int(sizes[c]), length=int(lengths[c]), n_states=n_states,
                          leakage=leakage, test_frac=test_frac) for c in CHAINS}


def batch(seqs: Sequence[np.ndarray]) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / HF-aligned ``labels`` (first state and padding -100;
    pad id 0), by the data collator."""
    rows = []
    for s in seqs:
        ids = np.asarray(s).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * min(1, len(ids)) + ids[1:]})
    return DataCollator(0).pad(rows)
