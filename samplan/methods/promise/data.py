"""Whole cache slices for promise's training without image augmentation (so that their features can be cached).

Training batches draw `foreground_slice_fraction` of their slices among those with foreground, the rest among all
slices of the training cases, seeded per (seed, epoch, batch) as the trainer's patch loader is. Validation uses one
fixed set of slices (every foreground slice and as many others, up to the epoch's batches), the same every epoch, so
the pseudo Dice that selects checkpoint_best compares like with like.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from samplan.engine.optim import derived_seed


class SliceLoader:
    """Batches `{"data": [(C, H, W) float32], "target": [(1, H, W) int16], "keys": [(case, z)], "whole_slices": True}`
    of whole slices (label values as stored)."""

    def __init__(self, cache_dir: str | Path, case_ids: Sequence[str], batch_size: int, foreground_fraction: float, *,
                 train: bool, seed: int):
        from samplan.preprocessing.cache import open_case

        self.batch_size, self.fg_fraction, self.train, self.seed = int(batch_size), float(foreground_fraction), train, seed
        self.cases = {c: open_case(cache_dir, c)[:2] for c in sorted(case_ids)}
        self.all: list[tuple[str, int]] = []
        self.fg: list[tuple[str, int]] = []
        for c, (_, seg) in self.cases.items():
            s = np.asarray(seg[:])[0]  # (Z, H, W)
            has = (s > 0).reshape(s.shape[0], -1).any(1)
            self.all += [(c, z) for z in range(s.shape[0])]
            self.fg += [(c, int(z)) for z in np.flatnonzero(has)]

    def _slice(self, key: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        data, seg = self.cases[key[0]]
        return (torch.from_numpy(np.ascontiguousarray(data[:, key[1]], dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(seg[:, key[1]]).astype(np.int16)))

    def _batch(self, keys: list[tuple[str, int]]) -> dict[str, Any]:
        pairs = [self._slice(k) for k in keys]
        return {"data": [p[0] for p in pairs], "target": [p[1] for p in pairs], "keys": keys, "whole_slices": True}

    def validation_keys(self, n_batches: int) -> list[tuple[str, int]]:
        """The fixed validation slices: foreground ones first, then others, up to `n_batches` batches."""
        rng = np.random.default_rng(derived_seed(self.seed, "validation slices"))
        fg = set(self.fg)
        others = [k for k in self.all if k not in fg]
        picked = [self.fg[i] for i in rng.permutation(len(self.fg))]
        picked += [others[i] for i in rng.permutation(len(others))][: len(self.fg)]
        return sorted(picked[: max(n_batches, 1) * self.batch_size])

    def epoch(self, e: int, n_batches: int) -> Iterator[dict[str, Any]]:
        """`n_batches` training batches of epoch `e`, or the fixed validation batches (at most `n_batches`)."""
        if not self.train:
            keys = self.validation_keys(n_batches)
            for s in range(0, len(keys), self.batch_size):
                yield self._batch(keys[s:s + self.batch_size])
            return
        for i in range(n_batches):
            rng = np.random.default_rng(derived_seed(self.seed, e, i))
            keys = []
            for _ in range(self.batch_size):
                pool = self.fg if self.fg and rng.random() < self.fg_fraction else self.all
                keys.append(pool[int(rng.integers(len(pool)))])
            yield self._batch(keys)

    def close(self) -> None:
        """Nothing to stop: slices are read in this process."""
