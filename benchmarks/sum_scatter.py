"""orch's ring reduce-scatter vs ``all_sum`` of the same buffer, over tc-shaped network-namespace links.

    sudo python benchmarks/sum_scatter.py [--hosts 2,3,4] [--rate 1gbit] [--mib 32] [--iters 5]

For each host count N it builds N network-namespace "hosts" wired as a ring of point-to-point cables
(``tests/netns.py``, no sshd), shapes what every host sends out of both of its ring interfaces with
``tc tbf`` to ``--rate``, and starts one rank per host on MLX's ring backend (the address of rank i is
host i's end of the cable from host i-1, so the ring's connections follow the cables). Each rank takes
``collectives.install`` (as ``orch run`` does), then alternately times ``mx.distributed.all_sum`` of a
``--mib`` MiB float32 buffer (the anchor) and ``mx.distributed.sum_scatter`` (orch's stand-in) of the
same buffer, each after a barrier; rank 0 prints the medians, their ratio and one
``SUM_SCATTER_JSON {...}`` line. The target is a ratio of at most 0.6: a reduce-scatter moves half of
an all-reduce's bytes. Shaping and hosts are removed in ``finally``.

``orch run benchmarks/sum_scatter.py -n 4 -- --worker`` runs the same timing on loopback (unshaped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import clear_qdiscs, parse_rank_args, ranks_on_hosts, tagged_json, tc_burst_bytes

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.6


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", default="2,3,4", help="comma-separated host counts (default 2,3,4)")
    ap.add_argument("--rate", default="1gbit", help="tc tbf rate of every ring interface (default 1gbit)")
    ap.add_argument("--mib", type=float, default=32.0, help="buffer size in MiB of float32 (default 32)")
    return parse_rank_args(ap, argv, iters=5, per="host count")


def worker(a: argparse.Namespace) -> None:
    import mlx.core as mx

    from orchestrator.runtime import collectives

    group = mx.distributed.init()
    collectives.install(group)  # what the bootstrap does under orch run
    rank, n = group.rank(), group.size()
    elems = int(a.mib * 2**20 / 4) // n * n
    buf = mx.random.normal((elems,), key=mx.random.key(rank))
    mx.eval(buf)

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    ops = {"all_sum": lambda: mx.distributed.all_sum(buf, group=group),
           "sum_scatter": lambda: mx.distributed.sum_scatter(buf, group=group)}
    times: dict[str, list[float]] = {k: [] for k in ops}
    for it in range(a.warmup + a.iters):
        for name in (list(ops) if it % 2 == 0 else list(ops)[::-1]):
            barrier()
            t0 = time.perf_counter()
            mx.eval(ops[name]())
            if it >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    if rank != 0:
        return
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["sum_scatter"] / med["all_sum"]
    link = os.environ.get("SUM_SCATTER_LINK", "loopback (unshaped)")
    nbytes = elems * 4
    print(f"# {n} ranks, {link}, {nbytes / 2**20:.0f} MiB float32, median of {a.iters} alternating rounds: "
          f"all_sum {med['all_sum'] * 1e3:.0f} ms, sum_scatter {med['sum_scatter'] * 1e3:.0f} ms, "
          f"ratio {ratio:.2f} (target <= {TARGET})", flush=True)
    print("SUM_SCATTER_JSON " + json.dumps({"ranks": n, "link": link, "bytes": nbytes, "median_s": med,
                                            "ratio": ratio, "iters": a.iters,
                                            "installed": mx.distributed.sum_scatter is collectives.sum_scatter,
                                            "times_s": times}), flush=True)


def shaped_run(a: argparse.Namespace, n: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.netns import NetnsCluster

    burst = tc_burst_bytes(a.rate)
    with NetnsCluster(n, sshd=False) as cluster, tempfile.TemporaryDirectory(prefix="sum-scatter-") as tmp:
        ends = [(h.namespace, iface) for h in cluster.hosts for iface in (h.left_iface, h.right_iface)]
        try:
            for ns, iface in ends:
                subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", iface, "root", "tbf", "rate", a.rate,
                                "burst", str(burst), "latency", "100ms"], check=True, timeout=20)
            hostfile = Path(tmp) / "hostfile.json"
            hostfile.write_text(json.dumps([[f"{h.left_ip}:{47100 + h.index}"] for h in cluster.hosts]))
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mib", str(a.mib),
                    "--iters", str(a.iters), "--warmup", str(a.warmup)]
            outputs = ranks_on_hosts(cluster, argv, [{
                "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "ORCH_BACKEND": "ring",
                "SUM_SCATTER_LINK": f"ring cables shaped to {a.rate} each way (tc tbf)", "PYTHONPATH": str(ROOT)}
                for rank in range(n)], tmp, a.timeout, f"{n} hosts at {a.rate}")
            print("\n".join(line for line in outputs[0].splitlines() if not line.startswith("SUM_SCATTER_JSON")),
                  flush=True)
            return tagged_json(outputs[0], "SUM_SCATTER_JSON")
        finally:
            clear_qdiscs(ends)


def main() -> None:
    a = parse_args(sys.argv[1:])
    if a.worker:
        worker(a)
        return
    results = [shaped_run(a, int(n)) for n in a.hosts.split(",") if n.strip()]
    print(f"\n| hosts | link | buffer | all_sum ms | sum_scatter ms | ratio (target <= {TARGET}) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['ranks']} | {r['link']} | {r['bytes'] / 2**20:.0f} MiB | {r['median_s']['all_sum'] * 1e3:.0f} | "
              f"{r['median_s']['sum_scatter'] * 1e3:.0f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
