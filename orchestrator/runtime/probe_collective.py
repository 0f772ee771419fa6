"""The rank side of ``orch check --collective``: a real all_sum across every rank, timed.

Started by ``orch check`` through the normal ``orch run`` machinery (guard, bootstrap,
staging over SSH), so it exercises exactly what a training run will. Every rank:

1. joins the group (``mx.distributed.init()``: ring or MPI, as the controller set);
2. all_sums a ``--size-mib`` float32 buffer whose values depend on the index and the
   rank (``i % 1024 + rank``), once to warm up and then ``--iters`` times, timed;
   the result must be exactly ``size * (i % 1024) + size * (size - 1) / 2``
   everywhere (integers below 2**24: exact in float32), which catches misordered
   or dropped chunks, not only a wrong total;
3. times ``--latency-iters`` all_sums of 8 bytes (small-message latency);
4. agrees with every other rank on correctness (one more all_sum).

Rank 0 reports a ``metric`` event (``allsum_*``, ``algbw_GBps``: bytes / time,
``busbw_GBps``: algbw x 2(n-1)/n, the traffic each link carries in a ring all_sum,
``latency_us``) and prints one line; a rank that saw a wrong result exits 1.
Also runs as a plain mlx.launch script (no events then).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

try:
    from orchestrator.runtime import events
except ImportError:  # plain mlx.launch: no controller to report to
    events = None


def _emit(kind: str, **fields) -> None:
    if events is not None:
        events.emit(kind, **fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=64.0)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--latency-iters", type=int, default=50)
    args = p.parse_args(argv)

    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    _emit("train_start", step=0, total_steps=None)  # arms the controller's watchdog: a hung ring is stopped

    n = max(1, int(args.size_mib * (1 << 20)) // 4)
    base = (mx.arange(n, dtype=mx.uint32) % 1024).astype(mx.float32)
    x = base + float(rank)
    expected = base * float(size) + float(size * (size - 1) // 2)
    mx.eval(x, expected)

    y = mx.distributed.all_sum(x, group=group)  # warm-up: connections, buffers
    mx.eval(y)
    correct = bool(mx.array_equal(y, expected).item())
    times = []
    for _ in range(max(1, args.iters)):
        t0 = time.perf_counter()
        y = mx.distributed.all_sum(x, group=group)
        mx.eval(y)
        times.append(time.perf_counter() - t0)
    correct = correct and bool(mx.array_equal(y, expected).item())

    small = mx.full((2,), float(rank + 1), dtype=mx.float32)  # 8 bytes
    small_expected = size * (size + 1) / 2
    lat = []
    for _ in range(max(1, args.latency_iters)):
        t0 = time.perf_counter()
        s = mx.distributed.all_sum(small, group=group)
        mx.eval(s)
        lat.append(time.perf_counter() - t0)
    correct = correct and bool(mx.all(s == small_expected).item())

    # Every rank's verdict, summed: the run is correct only if all ranks saw the right result.
    agree = mx.distributed.all_sum(mx.array([1.0 if correct else 0.0]), group=group)
    mx.eval(agree)
    all_correct = int(agree.item()) == size

    t = statistics.median(times)
    nbytes = n * 4
    algbw = nbytes / t / 1e9
    result = {
        "world_size": size,
        "allsum_bytes": nbytes,
        "allsum_s": round(t, 6),
        "allsum_iters": len(times),
        "algbw_GBps": round(algbw, 4),
        "busbw_GBps": round(algbw * 2 * (size - 1) / size, 4) if size > 1 else round(algbw, 4),
        "latency_us": round(statistics.median(lat) * 1e6, 2),
        "latency_iters": len(lat),
        "allsum_correct": all_correct,
    }
    if rank == 0:
        _emit("metric", step=0, values=result)
        print("probe_collective " + json.dumps(result), flush=True)
    if not correct:
        print(f"rank {rank}: all_sum result is WRONG", file=sys.stderr, flush=True)
        return 1
    return 0 if all_correct else 1


if __name__ == "__main__":
    sys.exit(main())
