"""The anchor: a hand-written data-parallel loop, launched with plain ``mlx.launch``.

No orchestrator import anywhere: this is what a user writes from MLX's
distributed docs. Same model, data, optimizer and per-rank batch as
``benchmarks/bench_mlp.py`` (keep the two in step).

    mlx.launch -n 4 --python "$(which python3)" benchmarks/mlx_launch_dp_loop.py --steps 60

(``mlx.launch`` 0.32.4 needs ``--python``, otherwise it tries to execute the
.py file itself.) Every rank prints one ``RESULT_JSON {...}`` line at the end
with its step end times; ``mlx.launch`` exits 0 even when ranks fail, so
``benchmarks/scaling.py`` checks that every rank printed one.

``--bind`` pins the rank to block ``rank`` of ``world`` equal blocks of the
allowed CPUs, the same split ``orch run --bind`` makes (``runtime/proctree.py``),
so both launchers can be compared pinned and unpinned.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def pin_self(rank: int, world: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // world)
    os.sched_setaffinity(0, cpus[rank * per:(rank + 1) * per] or [cpus[rank % len(cpus)]])


def world_from_env() -> int:
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            return len(json.load(f))
    except (KeyError, OSError, ValueError):
        return 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--in-dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bind", action="store_true")
    a = ap.parse_args()

    if a.bind and hasattr(os, "sched_setaffinity"):
        pin_self(int(os.environ.get("MLX_RANK", "0")), world_from_env())

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    group = mx.distributed.init()
    rank, world = group.rank(), group.size()

    class MLP(nn.Module):
        def __init__(self, in_dim: int, hidden: int, depth: int):
            super().__init__()
            dims = [in_dim] + [hidden] * depth
            self.layers = [nn.Linear(p, q) for p, q in zip(dims[:-1], dims[1:])] + [nn.Linear(hidden, 1)]

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nn.relu(layer(x))
            return self.layers[-1](x)

    def loss_fn(model, x, y):
        return nn.losses.mse_loss(model(x), y, reduction="mean")

    rng = np.random.default_rng(a.seed)
    x = rng.standard_normal((a.samples, a.in_dim), dtype=np.float32)
    w1 = rng.standard_normal((a.in_dim, 32), dtype=np.float32) / np.sqrt(a.in_dim)
    w2 = rng.standard_normal((32, 1), dtype=np.float32) / np.sqrt(32)
    y = (np.tanh(x @ w1) @ w2 + 0.01 * rng.standard_normal((a.samples, 1), dtype=np.float32)).astype(np.float32)

    mx.random.seed(a.seed)  # identical initial weights on every rank
    model = MLP(a.in_dim, a.hidden, a.depth)
    optimizer = optim.Adam(learning_rate=a.lr)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    global_batch = world * a.batch_size
    perm, offset, epoch = np.random.default_rng(a.seed).permutation(a.samples), 0, 0
    ends = []
    loss = None
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        if offset + global_batch > a.samples:
            epoch, offset = epoch + 1, 0
            perm = np.random.default_rng([a.seed, epoch]).permutation(a.samples)
        idx = perm[offset + rank * a.batch_size: offset + (rank + 1) * a.batch_size]
        offset += global_batch
        loss, grads = loss_and_grad(model, mx.array(x[idx]), mx.array(y[idx]))
        grads = nn.average_gradients(grads, group=group)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        ends.append(time.time())
    print("RESULT_JSON " + json.dumps({
        "rank": rank, "world": world, "pid": os.getpid(), "ends": ends, "loss": loss.item(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "samples_per_step": global_batch,
        "cpu_per_wall": (time.process_time() - cpu0) / (time.perf_counter() - wall0),
    }), flush=True)


if __name__ == "__main__":
    main()
