"""A deterministic, resumable, distributed batch sampler with optional length bucketing.

Every epoch is cut into *global steps* of ``G = batch_size * world_size`` indices; rank ``r`` takes the slice
``[r * batch_size, (r + 1) * batch_size)`` of each step. The global steps depend only on ``(seed, epoch,
num_samples, G, bucketing)``, not on how they are split across ranks, so 1 rank with batch 2B and 2 ranks with
batch B see the same global batches, and a checkpoint taken with one world size resumes on another with the
same ``G``.

Per epoch:

1. ``order`` = a permutation of ``range(num_samples)`` drawn from ``(seed, epoch)`` (or ``arange`` with
   ``shuffle=False``);
2. if ``num_samples`` is not a multiple of ``G``: ``drop_last=True`` drops the tail of ``order`` (every rank gets
   the same number of full batches); ``drop_last=False`` pads it by repeating indices from the start of
   ``order`` (``num_padded`` says how many), so every rank still gets the same number of full batches;
3. with ``lengths`` (bucketing): ``order`` is cut into chunks of ``bucket_steps`` global steps, each chunk is
   sorted by length (longest first, stable), cut into global steps, and the global steps of the whole epoch
   are shuffled again from ``(seed, epoch)``. Batches then hold similar lengths, which cuts padding.

``state_dict()`` records the epoch and the number of batches consumed in it; ``load_state_dict`` makes the next
iteration continue exactly after them. With a ``DataLoader`` using worker processes the sampler runs ahead of
the training loop by the prefetch depth: pass the number of batches the loop really consumed,
``state_dict(consumed=n)``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yield this rank's batches (lists of dataset indices); use as ``DataLoader(ds, batch_sampler=...)``."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, lengths: Sequence[int] | None = None,
                 bucket_steps: int = 50):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        if drop_last and num_samples < batch_size * world_size:
            raise ValueError(f"drop_last with {num_samples} samples < batch_size * world_size = "
                             f"{batch_size * world_size} leaves no batch")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.bucket_steps = int(bucket_steps)
        self.epoch = 0
        self._start = 0  # batches to skip at the next iteration (set by load_state_dict)
        self._consumed = 0  # batches yielded in the current epoch

    # ------------------------------------------------------------------ geometry
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_steps(self) -> int:
        """Batches per rank per epoch (identical on every rank)."""
        G = self.global_batch_size
        return self.num_samples // G if self.drop_last else -(-self.num_samples // G)

    @property
    def num_padded(self) -> int:
        """Repeated indices added per epoch to fill the last global step (0 with ``drop_last``)."""
        return 0 if self.drop_last else self.num_steps * self.global_batch_size - self.num_samples

    def __len__(self) -> int:
        return self.num_steps

    def global_steps(self, epoch: int | None = None) -> np.ndarray:
        """All global batches of an epoch, shape ``[num_steps, G]`` (rank r owns columns r*B:(r+1)*B)."""
        epoch = self.epoch if epoch is None else epoch
        G, S = self.global_batch_size, self.num_steps
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        need = S * G
        if need <= len(order):
            order = order[:need]
        else:  # wrap around (possibly several times for tiny datasets)
            order = np.resize(order, need)
        steps = order.reshape(S, G)
        if self.lengths is not None:
            chunk = max(1, self.bucket_steps)
            out = []
            for c in range(0, S, chunk):
                idx = steps[c:c + chunk].reshape(-1)
                idx = idx[np.argsort(-self.lengths[idx], kind="stable")]
                out.append(idx.reshape(-1, G))
            steps = np.concatenate(out, axis=0)
            if self.shuffle:
                steps = steps[rng.permutation(S)]
        return steps

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[list[int]]:
        steps = self.global_steps()
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        start, self._start = self._start, 0
        self._consumed = start
        for s in range(start, len(steps)):
            self._consumed = s + 1
            yield steps[s, lo:hi].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffle and pairing seeds); resets the mid-epoch position."""
        self.epoch = int(epoch)
        self._start = 0
        self._consumed = 0

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self, consumed: int | None = None) -> dict:
        """Position to resume from. ``consumed`` = batches the training loop consumed this epoch (defaults to
        the batches yielded so far, exact when the DataLoader has no worker prefetch)."""
        return {"epoch": self.epoch, "consumed": self._consumed if consumed is None else int(consumed),
                "seed": self.seed, "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "bucketing": self.lengths is not None}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next ``iter()`` continues after ``state['consumed']`` batches of ``state['epoch']``.
        The world size may differ if the global batch size is the same."""
        for key in ("seed", "num_samples", "global_batch_size", "shuffle", "drop_last", "bucketing"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state mismatch on {key}: checkpoint has {state[key]}, sampler has {mine}")
        if not 0 <= state["consumed"] <= self.num_steps:
            raise ValueError(f"consumed={state['consumed']} outside [0, {self.num_steps}]")
        self.epoch = int(state["epoch"])
        self._start = self._consumed = int(state["consumed"])
