"""Rank-side: time mx.distributed.all_sum at several sizes; rank 0 prints one JSON line.

    orch run benchmarks/allsum_sizes.py -n 2 [--backend mpi] -- --sizes-mib 1,16,64,256 --iters 5
"""
import argparse
import json
import statistics
import time

import mlx.core as mx

ap = argparse.ArgumentParser()
ap.add_argument("--sizes-mib", default="1,16,64,256")
ap.add_argument("--iters", type=int, default=5)
a = ap.parse_args()
g = mx.distributed.init()
out = {}
for mib in [int(x) for x in a.sizes_mib.split(",")]:
    x = mx.ones((mib * 2**20 // 4,), dtype=mx.float32)
    mx.eval(x)
    mx.eval(mx.distributed.all_sum(x[:1024]))  # warm-up and barrier
    times = []
    for _ in range(a.iters + 1):
        mx.eval(mx.distributed.all_sum(mx.zeros((1,))))  # barrier so late ranks do not count
        t0 = time.perf_counter()
        y = mx.distributed.all_sum(x)
        mx.eval(y)
        times.append(time.perf_counter() - t0)
    assert float(y[0].item()) == g.size(), "wrong all_sum result"
    out[mib] = statistics.median(times[1:])
if g.rank() == 0:
    print("ALLSUM " + json.dumps({"size": g.size(), "seconds": out}), flush=True)
