"""average_gradients as the trainer calls it vs a raw all_sum of the same bytes.

    orch run benchmarks/grad_average.py -n 2 -- [--models 256x3,1024x4,2048x4] [--iters 30]

Runs on every rank (rank 0 prints). For each model size (``HIDDENxDEPTH`` of
``benchmarks/bench_mlp.py``'s MLP) it computes real gradients once, then times,
in rounds whose order rotates, each of:

* ``trainer``: ``Trainer._average(grads, loss)``, the runtime's own call
  (``nn.average_gradients`` with MLX's default 32 MiB buckets, the loss riding
  along in the same buffer);
* ``avg size=S``: ``nn.average_gradients(grads, all_reduce_size=S)`` for each S
  in ``--bucket-sizes`` (0 = no bucketing: one all_sum per array);
* ``layout-aware``: ``bench_mlp.LayoutAwareAverage``, the same single all_sum but
  each gradient flattened in its memory order (the proposed runtime change);
* ``raw``: one ``mx.distributed.all_sum`` of one preallocated contiguous buffer with
  as many bytes as all the gradients plus the loss, divided by N: the anchor.

Each timing is ``mx.eval`` of the result, after a barrier so a rank that
arrives late does not count. Reports the median, the bandwidth
(bytes / time) and ``raw / method`` (>= 0.9: the method costs at most ~11 %
more than the bare collective).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bench_mlp
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from orchestrator.runtime.config import parse_hparams
from orchestrator.runtime.trainer import init_group


def parse_size(text: str) -> int:
    text = text.strip().lower()
    for suffix, mult in (("kib", 1024), ("mib", 1024**2), ("gib", 1024**3), ("k", 1024), ("m", 1024**2)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def barrier(group) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def build_methods(group, tr, grads, loss, raw_buf, layout, sizes) -> dict:
    """name -> a function returning the (lazy) averaged arrays."""
    world = group.size()
    methods = {
        "raw": lambda: mx.distributed.all_sum(raw_buf, group=group) / world,
        "trainer": lambda: tr._average(grads, loss),
        "layout-aware": lambda: layout({"grads": grads, "loss": loss}),
    }
    for s in sizes:
        methods[f"avg size={s // 1024} KiB" if s else "avg size=0 (per array)"] = (
            lambda s=s: nn.average_gradients(grads, group=group, all_reduce_size=s))
    return methods


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="256x3,1024x4,2048x4", help="HIDDENxDEPTH list")
    ap.add_argument("--bucket-sizes", default="0,256KiB,1MiB,4MiB,32MiB")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args(sys.argv[1:] if sys.argv[1:2] != ["--"] else sys.argv[2:])

    group = init_group()
    rank, world = group.rank(), group.size()
    if world < 2:
        sys.exit("run under a launcher with >= 2 ranks: orch run benchmarks/grad_average.py -n 2")
    say = print if rank == 0 else (lambda *_, **__: None)
    sizes = [parse_size(s) for s in a.bucket_sizes.split(",")]
    say(f"# average_gradients vs raw all_sum, {world} ranks, median of {a.iters} (after {a.warmup} warm-up)")
    say("| model | params | MiB | method | median ms | GB/s | raw/method |")
    say("|---|---|---|---|---|---|---|")
    verdicts = []
    for spec in a.models.split(","):
        hidden, depth = (int(v) for v in spec.lower().split("x"))
        hp = parse_hparams(bench_mlp.Config, ["--hidden", str(hidden), "--depth", str(depth), "--steps", "1"])
        tr = bench_mlp.BenchTrainer(bench_mlp.recipe, hp, group, "grad_average")
        _, micro = tr.sampler.next_step()
        loss, grads = tr.loss_and_grad(tr.model, *tr._batch(micro[0]))
        mx.eval(loss, grads)
        flat = tree_flatten(grads)
        n_elems = sum(g.size for _, g in flat) + 1
        nbytes = 4 * n_elems
        raw_buf = mx.random.normal((n_elems,), dtype=mx.float32)
        layout = bench_mlp.LayoutAwareAverage(group)
        mx.eval(raw_buf, layout({"grads": grads, "loss": loss}))  # learns the layouts
        # correctness: the layout-aware average equals nn.average_gradients'
        ref = nn.average_gradients(grads, group=group)
        got = layout({"grads": grads, "loss": loss})["grads"]
        worst = max(mx.abs(a - b).max().item() for (_, a), (_, b) in zip(tree_flatten(ref), tree_flatten(got)))
        if worst > 1e-6:
            raise SystemExit(f"layout-aware average differs from nn.average_gradients by {worst}")

        methods = build_methods(group, tr, grads, loss, raw_buf, layout, sizes)
        times: dict[str, list[float]] = {k: [] for k in methods}
        names = list(methods)
        for it in range(a.warmup + a.iters):
            shift = it % len(names)
            for name in names[shift:] + names[:shift]:
                barrier(group)
                t0 = time.perf_counter()
                mx.eval(methods[name]())
                dt = time.perf_counter() - t0
                if it >= a.warmup:
                    times[name].append(dt)
        raw = statistics.median(times["raw"])
        for name in names:
            m = statistics.median(times[name])
            say(f"| {spec} | {n_elems - 1:,} | {nbytes / 2**20:.2f} | {name} | {m * 1e3:.3f} | "
                f"{nbytes / m / 1e9:.2f} | {raw / m:.3f} |")
        verdicts.append((spec, raw / statistics.median(times["trainer"]), raw / statistics.median(times["layout-aware"])))
    for spec, ratio, ratio_la in verdicts:
        say(f"{spec}: raw all_sum / trainer's average_gradients = {ratio:.3f} "
            f"(target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); raw / layout-aware = {ratio_la:.3f} "
            f"({'met' if ratio_la >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
