"""Rank-side NCCL check on GPUs: the launcher's contract, all_sum correctness, then all_sum bandwidth.

    orch run benchmarks/nccl_allsum.py -n 2 --backend nccl -- --sizes-mib 1,16,64,256 --iters 10
    mlx.launch -n 2 --backend nccl benchmarks/nccl_allsum.py -- --sizes-mib 1,16,64,256 --iters 10

The same file under both launchers, so the numbers compare like with like.
Every rank prints one ``NCCL_RANK {...}`` line (what the launcher handed it:
``MLX_RANK``, ``MLX_WORLD_SIZE``, ``NCCL_HOST_IP``, ``NCCL_PORT``,
``CUDA_VISIBLE_DEVICES``, and the device MLX computes on), then checks
``all_sum`` of rank-dependent values in float32, bfloat16 and float16 against
the closed form (exits 1 on a wrong sum, so a launcher that reports success
means the collective is right). Rank 0 prints ``NCCL_JSON {...}``: median
seconds per all_sum of float32 buffers of each size, after a barrier so a late
rank's start is not counted, with the algorithm bandwidth (bytes / time) and
NCCL's bus bandwidth (``2 (N-1) / N`` x that, the figure ``nccl-tests``
reports, comparable across N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import mlx.core as mx

CONTRACT = ("MLX_RANK", "MLX_WORLD_SIZE", "NCCL_HOST_IP", "NCCL_PORT", "CUDA_VISIBLE_DEVICES", "ORCH_BACKEND")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="1,16,64,256")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backend", default="nccl", help="when no launcher names one ($ORCH_BACKEND)")
    a = ap.parse_args(sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:])
    backend = os.environ.get("ORCH_BACKEND") or a.backend
    expected = int(os.environ["MLX_WORLD_SIZE"]) if "MLX_WORLD_SIZE" in os.environ else None  # nccl's contract
    g = mx.distributed.init(backend=backend, strict=(expected or 1) > 1)
    rank, n = g.rank(), g.size()
    info = {"rank": rank, "size": n, "backend": backend, "device": str(mx.default_device()),
            "cuda": bool(mx.cuda.is_available()) if hasattr(mx, "cuda") else False,
            "env": {k: os.environ.get(k) for k in CONTRACT}}
    print("NCCL_RANK " + json.dumps(info), flush=True)
    if expected is not None and n != expected:
        sys.exit(f"rank {rank}: group has {n} ranks, the launcher said MLX_WORLD_SIZE={expected}")

    want = n * (n + 1) / 2  # sum over ranks of (rank + 1)
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        y = mx.distributed.all_sum(mx.full((4097,), rank + 1, dtype=dtype), group=g)
        mx.eval(y)
        got = y.astype(mx.float32)
        if not (bool(mx.all(got == want).item()) and y.dtype == dtype):
            sys.exit(f"rank {rank}: all_sum {dtype} gave {got[:4].tolist()}..., expected {want}")

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=g))

    seconds = {}
    for mib in (int(s) for s in a.sizes_mib.split(",") if s):
        x = mx.ones((mib * 2**20 // 4,), dtype=mx.float32)
        mx.eval(x)
        mx.eval(mx.distributed.all_sum(x, group=g))  # warm-up: NCCL sets up its channels on first use
        times = []
        for _ in range(a.iters):
            barrier()
            mx.synchronize()
            t0 = time.perf_counter()
            y = mx.distributed.all_sum(x, group=g)
            mx.eval(y)
            mx.synchronize()
            times.append(time.perf_counter() - t0)
        if float(y[0].item()) != n:
            sys.exit(f"rank {rank}: all_sum of ones gave {y[0].item()}, expected {n}")
        seconds[mib] = statistics.median(times)
    if rank == 0:
        bw = {mib: {"ms": s * 1e3, "algbw_GBps": mib * 2**20 / s / 1e9,
                    "busbw_GBps": 2 * (n - 1) / n * mib * 2**20 / s / 1e9 if n > 1 else None}
              for mib, s in seconds.items()}
        print("NCCL_JSON " + json.dumps({"size": n, "backend": backend, "all_sum_correct": True, "sizes": bw}),
              flush=True)


if __name__ == "__main__":
    main()
