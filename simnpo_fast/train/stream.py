"""The data stream: per optimizer step, this rank's micro-batches as :class:`~simnpo_fast.batch.ForgetRetainBatch`.

The sampler (:class:`~simnpo_fast.data.ShardedBatchSampler`) hands each rank its share of one global batch per
step; the share is cut into ``accum`` micro-batches of ``micro`` forget rows, each followed by the alternate
answers of those rows when the method has them, and by their retain partners when the loss has a retain term.
An exhausted epoch starts the next (the pairing of forget and retain examples, and the alternates, are re-drawn
for it). The position is resumable (:meth:`state_dict`).
"""
from __future__ import annotations

from typing import List

from ..batch import ForgetRetainBatch


class StepStream:
    """``next_step()`` -> this rank's ``accum`` micro-batches of the next optimizer step."""

    def __init__(self, dataset, sampler, collator, micro: int, accum: int, with_retain: bool):
        self.ds, self.sampler, self.collator = dataset, sampler, collator
        self.micro, self.accum, self.with_retain = micro, accum, with_retain
        self._it = iter(self.sampler)

    def next_step(self) -> List[ForgetRetainBatch]:
        try:
            idx = next(self._it)
        except StopIteration:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.ds.set_epoch(self.sampler.epoch)
            self._it = iter(self.sampler)
            idx = next(self._it)
        return [self.collate(idx[i * self.micro:(i + 1) * self.micro]) for i in range(self.accum)]

    def collate(self, idx: List[int]) -> ForgetRetainBatch:
        """The micro-batch of dataset items ``idx``: their forget examples, then (when the items carry them)
        their alternate answers, then (with a retain term) their retain partners, padded together;
        ``index`` = ``idx``."""
        items = [self.ds[i] for i in idx]
        retain = [it["retain"] for it in items] if self.with_retain else None
        alt = "alternate" in items[0] if items else False
        return ForgetRetainBatch.collate([it["forget"] for it in items], retain, self.collator, index=idx,
                                         alternate=[it["alternate"] for it in items] if alt else None,
                                         alternate_index=[it["alternate_index"] for it in items] if alt else None)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, st: dict) -> None:
        self.sampler.load_state_dict(st)
        self.ds.set_epoch(self.sampler.epoch)
        self._it = iter(self.sampler)
