"""The benchmark recipe: a compute-bound MLP trained by ``orchestrator.runtime``.

Used by ``benchmarks/scaling.py`` (and ``telemetry_overhead.py``); the
hand-written ``mlx.launch`` baseline (``benchmarks/mlx_launch_dp_loop.py``)
builds exactly the same model, data and optimizer.

    orch run benchmarks/bench_mlp.py -n 2 -- --steps 60 --profile-steps 20 --noreduce-steps 20

The normal steps are the runtime's own loop (``Trainer.fit``), so their step
events are what a user's run emits. After ``fit`` returns, two optional
measuring phases run in the same processes (their steps do not appear as step
events; each rank prints one ``BENCH_JSON {...}`` line instead):

* ``--profile-steps K``: K steps with an ``mx.eval`` after each phase, timing
  forward+backward, ``average_gradients`` (the trainer's ``_average``, with the
  wait for the slowest rank included: that wait is part of its cost) and the
  optimizer update separately;
* ``--noreduce-steps K``: K steps of ``Trainer.train_step`` with the gradient
  all-reduce switched off: what N ranks compute when they never communicate.
  ``throughput(noreduce, N) / (N x throughput(1))`` is the contention part of
  the efficiency (memory bandwidth, SMT siblings, the controller), and
  ``throughput(N) / throughput(noreduce, N)`` the communication part.

Knobs for what the runtime could do differently (the runtime itself is not
changed; this subclass overrides ``Trainer._average``):

* ``--all-reduce-size BYTES``: ``nn.average_gradients``' bucket size (-1: the
  runtime's own call, 0: one all_sum per array);
* ``--comm-stream``: run the all-reduces on their own CPU stream (another
  thread), so bucket k's reduction can overlap the rest of the backward pass.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from statistics import median
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from orchestrator.runtime import Hparams, Recipe, optimizer_from
from orchestrator.runtime.config import parse_hparams
from orchestrator.runtime.trainer import Trainer, init_group


@dataclass
class Config(Hparams):
    steps: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    in_dim: int = 64
    hidden: int = 256
    depth: int = 3
    samples: int = 16384
    log_every: int = 1000
    # benchmark-only knobs
    all_reduce_size: int = -1
    comm_stream: bool = False
    profile_steps: int = 0
    profile_wait: bool = False
    noreduce_steps: int = 0
    stats_toggle: int = 0
    layout_aware: bool = False


class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden`` with ReLU, then a scalar output."""

    def __init__(self, in_dim: int, hidden: int, depth: int):
        super().__init__()
        dims = [in_dim] + [hidden] * depth
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])] + [nn.Linear(hidden, 1)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def build(hp):
    return MLP(hp.in_dim, hp.hidden, hp.depth), optimizer_from(hp)


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y, reduction="mean")


def dataset(hp):
    """A fixed random teacher network; identical on every rank (seeded)."""
    rng = np.random.default_rng(hp.seed)
    x = rng.standard_normal((hp.samples, hp.in_dim), dtype=np.float32)
    w1 = rng.standard_normal((hp.in_dim, 32), dtype=np.float32) / np.sqrt(hp.in_dim)
    w2 = rng.standard_normal((32, 1), dtype=np.float32) / np.sqrt(32)
    y = np.tanh(x @ w1) @ w2 + 0.01 * rng.standard_normal((hp.samples, 1), dtype=np.float32)
    return x, y.astype(np.float32)


recipe = Recipe(hparams=Config, build=build, loss=loss_fn, data=dataset, name="bench_mlp")


def memory_order(a: mx.array) -> tuple[int, ...] | None:
    """The axis permutation p for which ``a.transpose(p)`` is row-contiguous, i.e. ``a``'s memory order.

    None when ``a`` is row-contiguous already or not a dense permutation of one
    (then flattening it copies, as before). Reads the strides MLX exports
    through the buffer protocol, which evaluates ``a``.
    """
    try:
        mv = memoryview(a)
    except (TypeError, ValueError, BufferError):  # e.g. a dtype the buffer protocol cannot describe
        return None
    if mv.c_contiguous or a.ndim < 2:
        return None
    order = sorted(range(a.ndim), key=lambda i: -mv.strides[i])
    expect = mv.itemsize
    for i in reversed(order):
        if a.shape[i] != 1 and mv.strides[i] != expect:
            return None
        expect *= a.shape[i]
    return tuple(order)


class LayoutAwareAverage:
    """Average a gradient tree over ``group`` in one all_sum, flattening every array in its memory order.

    ``nn.value_and_grad`` returns ``nn.Linear`` weight gradients column-major
    (the transpose of a row-major product). ``nn.average_gradients`` flattens
    them with ``reshape(-1)``, and ``all_sum`` needs a row-contiguous input: both
    force a strided transpose copy of every such gradient, which costs more than
    the reduction itself. Flattening ``g.transpose(p)`` (a free view) instead, and
    transposing back after the split, moves the same bytes with plain copies.
    The layout of each gradient is fixed by the graph, so it is read once.
    """

    def __init__(self, group) -> None:
        self.group = group
        self.perms: dict[str, tuple[int, ...] | None] | None = None

    def __call__(self, tree: Any) -> Any:
        flat = tree_flatten(tree)
        if len({v.dtype for _, v in flat}) != 1:
            return nn.average_gradients(tree, group=self.group)
        if self.perms is None:
            mx.eval([v for _, v in flat])
            self.perms = {k: memory_order(v) for k, v in flat}
        parts, metas = [], []
        for k, v in flat:
            p = self.perms.get(k)
            w = v.transpose(p) if p else v
            parts.append(w.reshape(-1))
            metas.append((k, w.shape, p, w.size))
        big = mx.distributed.all_sum(mx.concatenate(parts), group=self.group) / self.group.size()
        offsets, acc = [], 0
        for *_, size in metas[:-1]:
            acc += size
            offsets.append(acc)
        out = []
        for piece, (k, shape, p, _) in zip(mx.split(big, offsets), metas):
            a = piece.reshape(shape)
            if p:
                a = a.transpose([p.index(i) for i in range(len(p))])
            out.append((k, a))
        return tree_unflatten(out)


class BenchTrainer(Trainer):
    """The runtime's trainer with the all-reduce made switchable and tunable."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reduce = True
        self.comm_stream = mx.new_stream(mx.cpu) if self.hp.comm_stream else None
        self.layout_average = LayoutAwareAverage(self.group) if self.hp.layout_aware else None
        # --stats-toggle K: memory stats every step for K steps, then none for K steps, ...;
        # (stats on for the step, wall time from this step's start to the next one's)
        self.intervals: list[tuple[bool, float]] = []
        self._last_start: float | None = None
        self._stats_on = False

    def train_step(self):
        now = time.perf_counter()
        if self._last_start is not None and self.hp.stats_toggle:
            self.intervals.append((self._stats_on, now - self._last_start))
        self._last_start = now
        out = super().train_step()
        if self.hp.stats_toggle:
            # fit() samples after this returns when hp.stats_every divides the step just done
            self._stats_on = (self.step // self.hp.stats_toggle) % 2 == 1
            self.hp.stats_every = 1 if self._stats_on else 0
        return out

    def _average(self, grads: Any, loss: mx.array):
        if not self.reduce:
            return grads, loss
        if self.world == 1:
            return grads, loss
        if self.layout_average is not None:
            averaged = self.layout_average({"grads": grads, "loss": loss})
            return averaged["grads"], averaged["loss"]
        if self.hp.all_reduce_size < 0 and self.comm_stream is None:
            return super()._average(grads, loss)
        size = self.hp.all_reduce_size if self.hp.all_reduce_size >= 0 else 32 * 1024**2
        averaged = nn.average_gradients({"grads": grads, "loss": loss}, group=self.group,
                                        all_reduce_size=size, communication_stream=self.comm_stream)
        return averaged["grads"], averaged["loss"]


def _barrier(group, quiet=None) -> None:
    if quiet is not None:
        quiet.wait()
    elif group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def profile(tr: BenchTrainer, steps: int) -> dict:
    """Per-phase times of ``steps`` steps (an eval after each phase).

    With ``--profile-wait`` a one-element all_sum (a barrier) runs between the
    gradients and their averaging, so the all-reduce time splits into waiting
    for the slowest rank (``wait_s``, the barrier's own latency included) and
    moving the bytes (``allreduce_s``): only the second can shrink with a
    narrower wire dtype.
    """
    comp, avg, upd, total, wait = [], [], [], [], []
    _barrier(tr.group)
    for _ in range(steps):
        _, micro = tr.sampler.next_step()
        t0 = time.perf_counter()
        loss_sum, grad_sum = None, None
        for indices in micro:
            loss, grads = tr.loss_and_grad(tr.model, *tr._batch(indices))
            if grad_sum is None:
                loss_sum, grad_sum = loss, grads
            else:
                loss_sum = loss_sum + loss
                grad_sum = tree_map(mx.add, grad_sum, grads)
            mx.eval(loss_sum, grad_sum)
        t1 = time.perf_counter()
        comp.append(t1 - t0)  # this rank's own forward+backward, without waiting for the others
        if tr.hp.profile_wait:
            _barrier(tr.group, tr.quiet if tr.quiet is not None and tr.quiet.active else None)
            t1b = time.perf_counter()
            wait.append(t1b - t1)
            t1 = t1b
        grads, loss = tr._average(grad_sum, loss_sum)
        mx.eval(grads, loss)
        t2 = time.perf_counter()
        tr.optimizer.update(tr.model, grads)
        mx.eval(tr.model.parameters(), tr.optimizer.state)
        t3 = time.perf_counter()
        loss.item()
        avg.append(t2 - t1)
        upd.append(t3 - t2)
        total.append(time.perf_counter() - t0)
    out = {"compute_s": median(comp), "allreduce_s": median(avg), "update_s": median(upd),
           "total_s": median(total), "allreduce_share": sum(avg) / sum(total),
           "compute_steps_ms": [round(c * 1e3, 2) for c in comp]}
    if wait:
        out.update(wait_s=median(wait), wait_share=sum(wait) / sum(total),
                   wait_steps_ms=[round(w * 1e3, 2) for w in wait])
    return out


def noreduce(tr: BenchTrainer, steps: int) -> dict:
    """Wall time per step of the real train_step with the all-reduce switched off."""
    tr.reduce = False
    _barrier(tr.group)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = tr.train_step()
        loss.item()
    dt = (time.perf_counter() - t0) / steps
    tr.reduce = True
    _barrier(tr.group)
    return {"step_s": dt}


def _threads() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def main() -> None:
    hp = parse_hparams(Config, prog="bench_mlp")
    group = init_group()
    tr = BenchTrainer(recipe, hp, group, "bench_mlp")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    tr.fit()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    out: dict = {"rank": tr.rank, "world": tr.world, "pid": os.getpid(),
                 "fit_cpu_per_wall": cpu / wall, "threads": _threads(),
                 "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                 "params": sum(v.size for _, v in tree_flatten(tr.model.parameters())),
                 "samples_per_step": tr.sampler.samples_per_step}
    if hp.stats_toggle:
        warm = 2 * hp.stats_toggle  # the first on/off pair is warm-up
        on = [dt for (flag, dt) in tr.intervals[warm:] if flag]
        off = [dt for (flag, dt) in tr.intervals[warm:] if not flag]
        out["toggle"] = {"on_median_s": median(on), "off_median_s": median(off),
                         "on_mean_s": sum(on) / len(on), "off_mean_s": sum(off) / len(off),
                         "n_on": len(on), "n_off": len(off)}
    if hp.profile_steps:
        out["profile"] = profile(tr, hp.profile_steps)
    if hp.noreduce_steps:
        out["noreduce"] = noreduce(tr, hp.noreduce_steps)
    print("BENCH_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
