"""The forget/retain paired dataset: every forget example with a retain partner drawn by a seeded rule
(:data:`PAIRINGS`), or alone for a method without a retain term; :func:`load_forget_retain` loads, encodes and
pairs two splits of a TOFU-layout source."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .formats import DataError, DataWarning, _lines


#: forget -> retain pairing rules of :class:`ForgetRetainDataset`
PAIRINGS = ("random", "cycle", "fixed", "seeded_offset")


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Each item is ``{"forget": forget[i], "retain": retain[j]}``, one item per forget example; with
    ``retain=None`` (a method without a retain term) each item is ``{"forget": forget[i]}``, nothing is drawn.

    The retain partner ``j`` follows a seeded rule, identical on every rank and process:

    * ``pairing="random"`` (default): ``j = perm[i % R]`` with ``perm`` a permutation of the R retain examples
      drawn from ``(seed, epoch)``; forget examples get distinct partners while ``i < R``.
    * ``pairing="cycle"``: ``j = (i + offset) % R`` with ``offset`` drawn from ``(seed, epoch)``.
    * ``pairing="fixed"``: ``j = i % R`` (no randomness).
    * ``pairing="seeded_offset"``: ``j = (i + r_i) % R`` with ``r_i`` the first ``torch.randint(0, R)`` draw after
      ``torch.manual_seed(i)``: the same partner every epoch, the SimNPO authors' rule (OPTML-Group/Unlearn-Simple
      ``TOFU/data_module.py`` ``TextForgetDatasetQA.__getitem__``), drawn from a generator of its own here (their
      code reseeds the global RNG on every item).

    :meth:`set_epoch` re-draws the pairing (call it in the main process before creating the epoch's iterator).
    Examples shared by the two sets (same token ids) raise a :class:`DataWarning` with the count.
    """

    def __init__(self, forget, retain=None, *, seed: int = 0, pairing: str = "random", check_overlap: bool = True):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        if len(forget) == 0:
            raise DataError(getattr(forget, "source", "forget"), "the forget set is empty")
        if retain is not None and len(retain) == 0:
            raise DataError(getattr(retain, "source", "retain"), "the retain set is empty")
        self.forget, self.retain = forget, retain
        self.seed, self.pairing = int(seed), pairing
        self.epoch = 0
        self.shared = self._overlap() if check_overlap and retain is not None else []
        if self.shared:
            warnings.warn(f"forget and retain share {len(self.shared)} example(s) "
                          f"(forget items {_lines(self.shared)})", DataWarning, stacklevel=2)
        self._draw()

    def _overlap(self) -> list[int]:
        def keys(ds):
            if hasattr(ds, "keys") and callable(ds.keys):
                return ds.keys()
            return [tuple(ds[i]["input_ids"]) for i in range(len(ds))]
        seen = set(keys(self.retain))
        return [i for i, k in enumerate(keys(self.forget)) if k in seen]

    def _draw(self) -> None:
        if self.retain is None:
            return
        R = len(self.retain)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.pairing == "random":
            self._perm = rng.permutation(R)
        elif self.pairing == "cycle":
            self._offset = int(rng.integers(R))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._draw()

    def retain_index(self, i: int) -> int:
        R = len(self.retain)
        if self.pairing == "random":
            return int(self._perm[i % R])
        if self.pairing == "cycle":
            return (i + self._offset) % R
        if self.pairing == "seeded_offset":
            g = torch.Generator().manual_seed(int(i))
            return (i + int(torch.randint(0, R, (1,), generator=g))) % R
        return i % R

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if self.retain is None:
            return {"forget": self.forget[i]}
        return {"forget": self.forget[i], "retain": self.retain[self.retain_index(i)]}

    @property
    def lengths(self) -> list[int]:
        """Per item, the longer of its forget and retain example (for length bucketing)."""
        if self.retain is None:
            return [len(self.forget[i]["input_ids"]) for i in range(len(self))]
        return [max(len(self.forget[i]["input_ids"]), len(self.retain[self.retain_index(i)]["input_ids"]))
                for i in range(len(self))]


def load_forget_retain(source: str, tokenizer, forget_split: str = "forget10", retain_split: str | None = None, *,
                       template=None, max_length: int = 512, overlong: str = "truncate", seed: int = 0,
                       pairing: str = "random", idk: bool | str = False):
    """Load, encode and pair two splits of a TOFU-layout source in one call. ``retain_split`` defaults to the
    complement of ``forget_split`` (``forget10`` -> ``retain90``). ``idk=True`` (or a file path) also pairs every
    forget question with a refusal drawn each epoch from ``<source>/idontknow.jsonl`` (or that file) and returns
    a :class:`~simnpo_fast.data.alternates.WithAlternates` (items gain ``"alternate"`` / ``"alternate_index"``)
    for IDK methods such as ``idk_dpo``."""
    from .alternates import IDK_FILE, WithAlternates, encode_alternates, forget_questions, load_idk
    from .formats import RETAIN_OF, load_tofu
    from .template import encode_qa

    if retain_split is None:
        if forget_split not in RETAIN_OF:
            raise ValueError(f"no default retain split for {forget_split!r}; pass retain_split")
        retain_split = RETAIN_OF[forget_split]
    raw = {s: load_tofu(source, s) for s in (forget_split, retain_split)}
    sets = [encode_qa(raw[s], tokenizer, template=template, max_length=max_length, overlong=overlong,
                      source=f"{source}:{s}") for s in (forget_split, retain_split)]
    ds = ForgetRetainDataset(sets[0], sets[1], seed=seed, pairing=pairing)
    if not idk:
        return ds
    path = os.path.join(source, IDK_FILE) if idk is True else os.fspath(idk)
    alts = encode_alternates(forget_questions(raw[forget_split], sets[0]), load_idk(path), tokenizer,
                             template=template, max_length=max_length, seed=seed, source=f"{path} x {forget_split}")
    return WithAlternates(ds, alts)
