"""Per-rank batches sized to each rank's speed (``--balance speed``), the global batch unchanged.

Synchronous data parallelism waits for the slowest rank every step: a MacBook
Air next to a Mac Studio makes the Studio idle most of the time. With
``--balance speed`` each rank's share of every global micro-batch is
proportional to the speed it measured, so all ranks finish their part at about
the same time, while the *global* batch (``world x --batch-size x
--grad-accum`` samples per step) and hence the training stays what it was:

* **Data** (:class:`BalancedSampler`): the same global permutation and the same
  global micro-batches as :class:`~orchestrator.runtime.data.ShardedSampler`;
  rank ``r`` takes the contiguous slice ``[b_0 + ... + b_{r-1}, ... + b_r)`` of
  each one, so the union of the ranks' samples in a step is exactly the global
  batch's samples, whatever the shares.
* **Gradients** (:func:`weight`): each rank's loss is the mean over its own
  ``b_r`` samples, so before the all-reduce (which sums and divides by the
  world size N) its gradient is multiplied by ``N * b_r / B``. The result,
  ``sum_r b_r * g_r / B``, is the mean over the global batch: the update one
  rank with the whole batch would compute, up to float rounding.
* **Speeds** are measured, per rank, as samples per second of *its own*
  compute (sampling, forward, backward; the all-reduce, where fast ranks wait
  for slow ones, is excluded), summed over the steps since the last check.
  After ``--balance-warmup`` steps (the first step of a run is left out: it
  pays for allocation and warm-up) and then every ``--balance-every`` steps,
  every rank hands in its speed (one tiny all_sum) and every rank computes the
  same new split from the same numbers: no rank decides for the others and
  nothing else is sent.
* **Re-balancing** happens only at step boundaries, and only when the new split
  is predicted to shorten the step (the slowest rank's time) by more than
  ``--balance-threshold`` (default 10 %): noise in the timings does not make
  the shares flap, a laptop that starts throttling does move them. Each change
  is a ``rebalance`` event.

This module is numpy/stdlib only (the trainer passes in the all-gather), so
the arithmetic is unit-tested without MLX or a group.

Test hook: ``ORCH_BALANCE_TEST_SPEEDS="1,3@0;3,1@10"`` replaces the measured
speeds (rank r reports the r-th number; from step 0 on ``1,3``, from step 10
on ``3,1``), so a test forces a re-balance at a known step instead of relying
on timing. The all-gather and the decision still run for real.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from orchestrator import protocol
from orchestrator.runtime.data import DataPosition, ShardedSampler

TEST_SPEEDS_ENV = protocol.ENV_BALANCE_TEST_SPEEDS


def split(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split into integers proportional to ``weights``, each >= 1, summing to ``total``.

    Largest remainder: every rank first gets ``max(1, floor(ideal))``, then the
    difference is handed out (or taken back from shares above 1) one sample at
    a time in order of how far each share is from its ideal; ties go to the
    lower rank, so every rank computes the same split from the same weights.
    Non-positive or non-finite weights count as the smallest positive one (a
    rank that reported nothing still gets a share).
    """
    n = len(weights)
    if n == 0:
        raise ValueError("no ranks to split over")
    if total < n:
        raise ValueError(f"cannot give each of {n} ranks at least one of {total} samples")
    good = [float(w) for w in weights if math.isfinite(w) and w > 0]
    floor_w = min(good) if good else 1.0
    w = [float(x) if math.isfinite(x) and x > 0 else floor_w for x in weights]
    s = sum(w)
    ideal = [total * x / s for x in w]
    shares = [max(1, int(math.floor(x))) for x in ideal]
    while sum(shares) < total:
        r = max(range(n), key=lambda i: (ideal[i] - shares[i], -i))
        shares[r] += 1
    while sum(shares) > total:
        r = min((i for i in range(n) if shares[i] > 1), key=lambda i: (ideal[i] - shares[i], i))
        shares[r] -= 1
    return shares


def weight(shares: Sequence[int], rank: int) -> float:
    """The factor on rank ``rank``'s mean gradient before an *averaging* all-reduce (sum / N).

    ``N * b_r / B``: then ``sum_r (N b_r / B) g_r / N = sum_r b_r g_r / B``,
    the global-batch mean. 1.0 exactly when the shares are equal.
    """
    total = sum(shares)
    return len(shares) * shares[rank] / total


def step_time(shares: Sequence[int], speeds: Sequence[float]) -> float:
    """The predicted compute time of a step: the slowest rank's ``b_r / speed_r``."""
    return max(b / s if s > 0 else math.inf for b, s in zip(shares, speeds, strict=True))


def parse_test_speeds(text: str, world: int) -> list[tuple[int, list[float]]]:
    """``"1,3@0;3,1@10"`` -> ``[(0, [1.0, 3.0]), (10, [3.0, 1.0])]`` (sorted by step)."""
    schedule = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        values, _, at = part.partition("@")
        try:
            speeds = [float(v) for v in values.split(",")]
            start = int(at or 0)
        except ValueError:
            raise ValueError(f"{TEST_SPEEDS_ENV}: {part!r} is not 'S0,S1,...@STEP'") from None
        if len(speeds) != world:
            raise ValueError(f"{TEST_SPEEDS_ENV}: {part!r} has {len(speeds)} speeds for {world} ranks")
        schedule.append((start, speeds))
    return sorted(schedule, key=lambda e: e[0])


@dataclass
class Decision:
    """What a check decided; ``changed`` means the shares are now ``shares`` (was ``previous``)."""

    step: int
    shares: list[int]
    previous: list[int]
    speeds: list[float]
    reason: str
    predicted_step_s: float
    previous_step_s: float

    @property
    def changed(self) -> bool:
        return self.shares != self.previous

    def event_fields(self) -> dict:
        return {
            "step": self.step, "shares": list(self.shares), "previous": list(self.previous),
            "speeds": [round(s, 3) for s in self.speeds], "reason": self.reason,
            "predicted_step_s": _finite(self.predicted_step_s), "previous_step_s": _finite(self.previous_step_s),
        }


def _finite(x: float) -> Optional[float]:
    return round(x, 6) if math.isfinite(x) else None


@dataclass
class Balancer:
    """This rank's view of the shares, its speed window, and the check schedule.

    ``gather(speed) -> [speed of rank 0, ..., speed of rank N-1]`` is a
    collective every rank calls at the same steps (the trainer's all_sum).
    """

    world: int
    rank: int
    global_micro: int  # samples per global micro-batch: world x --batch-size
    gather: Callable[[float], list[float]]
    every: int = 10
    warmup: int = 3
    threshold: float = 0.1
    shares: list[int] = field(default_factory=list)
    test_speeds: Optional[list[tuple[int, list[float]]]] = None
    _samples: int = 0
    _seconds: float = 0.0
    _next_check: Optional[int] = None
    _skip_next: bool = True  # the first measured step of a run is warm-up
    decisions: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.shares:
            self.shares = split(self.global_micro, [1.0] * self.world)
        if self.test_speeds is None and os.environ.get(TEST_SPEEDS_ENV):
            self.test_speeds = parse_test_speeds(os.environ[TEST_SPEEDS_ENV], self.world)

    @property
    def share(self) -> int:
        return self.shares[self.rank]

    @property
    def weight(self) -> float:
        return weight(self.shares, self.rank)

    def start(self, step: int) -> None:
        """Training (re)starts after ``step``: the first check is ``warmup`` measured steps later."""
        self._next_check = step + 1 + self.warmup  # +1: the first step is not measured

    def record(self, seconds: float, samples: Optional[int] = None) -> None:
        """One step's compute time on this rank (``samples`` defaults to this rank's share x 1)."""
        if self._skip_next:
            self._skip_next = False
            return
        self._samples += self.share if samples is None else samples
        self._seconds += seconds

    def _my_speed(self, step: int) -> float:
        if self.test_speeds:
            current = [s for at, s in self.test_speeds if at <= step]
            if current:
                return current[-1][self.rank]
        return self._samples / self._seconds if self._seconds > 0 else 0.0

    def due(self, step: int) -> bool:
        if self._next_check is None:
            self.start(step - 1)
        return step >= self._next_check  # type: ignore[operator]

    def check(self, step: int) -> Optional[Decision]:
        """After step ``step``: if a check is due, gather speeds and maybe change the shares (every rank)."""
        if not self.due(step):
            return None
        self._next_check = step + self.every
        speeds = [float(s) for s in self.gather(self._my_speed(step))]
        self._samples, self._seconds = 0, 0.0
        previous = list(self.shares)
        first = not self.decisions
        reason = "calibration" if first else "drift"
        proposal = split(self.global_micro, speeds) if all(s > 0 for s in speeds) else previous
        before, after = step_time(previous, speeds), step_time(proposal, speeds)
        if proposal != previous and after < before * (1.0 - self.threshold):
            self.shares = proposal
            self._skip_next = False  # shapes changed but nothing is compiled: the next step is a fair sample
        decision = Decision(step, list(self.shares), previous, speeds, reason, step_time(self.shares, speeds), before)
        self.decisions.append(decision)
        return decision


class BalancedSampler(ShardedSampler):
    """:class:`ShardedSampler` with per-rank shares of every global micro-batch (see the module doc).

    With equal shares it yields exactly what ``ShardedSampler`` yields.
    """

    def __init__(self, n: int, *, rank: int, world: int, batch_size: int, grad_accum: int, seed: int,
                 position: DataPosition | None = None, shares: Optional[Sequence[int]] = None):
        super().__init__(n, rank=rank, world=world, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                         position=position)
        self.shares = list(shares) if shares is not None else [batch_size] * world

    def set_shares(self, shares: Sequence[int]) -> None:
        shares = list(shares)
        if len(shares) != self.world or sum(shares) != self.world * self.batch_size or min(shares) < 1:
            raise ValueError(f"shares {shares} do not split {self.world} x {self.batch_size} over {self.world} ranks")
        self.shares = shares

    def _slot(self) -> tuple[int, int]:
        """This rank's share of each global micro-batch, after the shares of the ranks before it."""
        return sum(self.shares[:self.rank]), self.shares[self.rank]
