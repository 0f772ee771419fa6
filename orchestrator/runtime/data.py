"""Data sharding: every sample is seen by exactly one rank per epoch.

The order is a *global* permutation per epoch, derived from ``(seed, epoch)``
only, so every rank computes the same one without talking to the others. One
optimizer step consumes ``grad_accum`` global micro-batches of ``world *
batch_size`` samples each; rank ``r`` takes the contiguous slice ``[r*b,
(r+1)*b)`` of every global micro-batch. Hence N ranks with batch ``b`` see,
step for step, exactly the samples that 1 rank with batch ``N*b`` sees, and
(averaging gradients) compute the same update up to float rounding.

The position in the data is ``(epoch, offset)``, offset counted in samples
into that epoch's permutation. It is saved in checkpoints; because it is in
samples, not steps, a run can resume with a different number of ranks.
A tail smaller than one step's worth of samples is dropped at each epoch end.

This module uses numpy only (no MLX): the trainer turns batches into arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Dataset(Protocol):
    """Anything with a length that returns a tuple of numpy arrays for an index array."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: np.ndarray) -> tuple[np.ndarray, ...]: ...


class ArrayDataset:
    """A tuple of arrays that share their first dimension: ``(X, Y)``."""

    def __init__(self, *arrays: Any):
        if not arrays:
            raise ValueError("ArrayDataset needs at least one array")
        self.arrays = tuple(np.asarray(a) for a in arrays)
        n = len(self.arrays[0])
        for a in self.arrays[1:]:
            if len(a) != n:
                raise ValueError(f"arrays differ in length: {[len(x) for x in self.arrays]}")

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(a[indices] for a in self.arrays)


def as_dataset(data: Any) -> Dataset:
    """Accept ``(X, Y)`` (numpy or MLX arrays, lists) or an object implementing :class:`Dataset`."""
    if isinstance(data, (tuple, list)):
        return ArrayDataset(*data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return data
    raise TypeError(f"dataset must be a tuple of arrays or have __len__/__getitem__, got {type(data).__name__}")


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of one epoch; the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0  # samples into this epoch's permutation


class ShardedSampler:
    """Yields, per step, this rank's ``grad_accum`` micro-batches of sample indices."""

    def __init__(self, n: int, *, rank: int, world: int, batch_size: int, grad_accum: int, seed: int,
                 position: DataPosition | None = None):
        self.n, self.rank, self.world = n, rank, world
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.samples_per_step = world * batch_size * grad_accum
        if self.samples_per_step > n:
            raise ValueError(
                f"one step needs {self.samples_per_step} samples (world {world} x batch {batch_size} x "
                f"grad-accum {grad_accum}) but the dataset has only {n}"
            )
        self.position = position or DataPosition()
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def next_step(self) -> tuple[int, list[np.ndarray]]:
        """``(epoch, index arrays of this rank's micro-batches)`` for the next step; advances the position."""
        pos = self.position
        if pos.offset + self.samples_per_step > self.n:
            pos.epoch, pos.offset = pos.epoch + 1, 0
        chunk = self._permutation(pos.epoch)[pos.offset:pos.offset + self.samples_per_step]
        global_micro = self.world * self.batch_size
        start, size = self._slot()
        micro = [chunk[j * global_micro + start: j * global_micro + start + size] for j in range(self.grad_accum)]
        pos.offset += self.samples_per_step
        return pos.epoch, micro

    def _slot(self) -> tuple[int, int]:
        """(offset, size) of this rank's samples within each global micro-batch: equal slots here."""
        return self.rank * self.batch_size, self.batch_size


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic index split, the same on every rank (used by recipes)."""
    perm = np.random.default_rng([seed, 0x7E57]).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]

