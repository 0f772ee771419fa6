"""``--shard full`` step time against data parallelism at N=4, over tc-shaped namespace links.

    sudo python benchmarks/shard_step_time.py [--rates 10gbit,1gbit] [--hidden 2048 --depth 8] [--iters 6]

For each rate it builds 4 network-namespace "hosts" wired as a ring of point-to-point cables
(``tests/netns.py``, no sshd), shapes what every host sends out of both ring interfaces with ``tc tbf``
(``harness.tc_burst_bytes``), and starts one rank per host on MLX's ring backend (``harness.ranks_on_hosts``).
Every rank builds two runtime ``Trainer``s on ``bench_mlp``'s MLP (default 2048x8: 29.5 M parameters,
118 MB, Adam; the model of ``shard_memory.py``): data parallelism (the anchor) and ``--shard full``.
Each round times one ``train_step`` of each, in alternating order, after a barrier; then, once per round,
the collectives a ``--shard full`` step makes, alone and in the step's order: each sharded layer's
``all_gather`` twice (forward, and again in the recomputed backward pass) and its gradient's
``sum_scatter``, each evaluated on its own. Their sum over the full step's time is the share of the step
spent in gather/scatter (the runtime's per-step telemetry has their bytes, ``shard_*_bytes_per_step``,
not their time). Rank 0 prints per rate the medians, the ratio full / data parallel (target <= 1.5 at
10 Gbit/s) and one ``SHARD_STEP_JSON {...}`` line. Qdiscs and hosts are removed in ``finally``.
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

from harness import clear_qdiscs, parse_rank_args, ranks_on_hosts, result_line, tagged_json, tc_burst_bytes

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.5  # --shard full / data parallel step time at 10 Gbit/s
N = 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="10gbit,1gbit", help="comma-separated tc tbf rates (default 10gbit,1gbit)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    return parse_rank_args(ap, argv, iters=6, per="rate")


# ----------------------------------------------------------------------------- one rank


def worker(a: argparse.Namespace) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import bench_mlp
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from orchestrator.runtime.config import parse_hparams
    from orchestrator.runtime.trainer import Trainer, init_group

    group = init_group()
    rank, world = group.rank(), group.size()
    base = ["--hidden", str(a.hidden), "--depth", str(a.depth), "--batch-size", str(a.batch_size), "--steps", "1",
            "--stats-every", "0", "--no-memory-check", "--optimizer", "adam"]
    trainers = {stage: Trainer(bench_mlp.recipe, parse_hparams(bench_mlp.Config, base + ["--shard", stage]), group,
                               f"shard-{stage}") for stage in ("none", "full")}
    full = trainers["full"].sharded
    layers = [[a for _, a in tree_flatten(full._leaf_wrapper(p).module.parameters())] for p in full.wrapped]

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    def collectives() -> tuple[float, float]:
        """The gathers and reduce-scatters of one --shard full step, alone, in the step's order."""
        gather = scatter = 0.0
        flats = [mx.concatenate([s.reshape(1, -1) for s in shards], axis=1) for shards in layers]
        grads = [mx.ones((world * f.size,)) for f in flats]
        mx.eval(flats, grads)
        for f in flats + flats[::-1]:  # forward, then the recomputed backward pass
            t0 = time.perf_counter()
            mx.eval(mx.distributed.all_gather(f, group=group))
            gather += time.perf_counter() - t0
        for g in grads[::-1]:
            t0 = time.perf_counter()
            mx.eval(mx.distributed.sum_scatter(g, group=group))
            scatter += time.perf_counter() - t0
        return gather, scatter

    times: dict[str, list[float]] = {"none": [], "full": [], "gather": [], "scatter": []}
    for it in range(a.warmup + a.iters):
        for stage in (("none", "full") if it % 2 == 0 else ("full", "none")):
            barrier()
            t0 = time.perf_counter()
            trainers[stage].train_step()
            if it >= a.warmup:
                times[stage].append(time.perf_counter() - t0)
        barrier()
        gather, scatter = collectives()
        if it >= a.warmup:
            times["gather"].append(gather)
            times["scatter"].append(scatter)
    if rank != 0:
        return
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["full"] / med["none"]
    share = (med["gather"] + med["scatter"]) / med["full"]
    link = os.environ.get("SHARD_STEP_LINK", "loopback (unshaped)")
    wire = {stage: tr.wire_metrics() for stage, tr in trainers.items()}  # the runtime's end-of-run metrics
    print(f"# {world} ranks, {link}; {a.hidden}x{a.depth} MLP (Adam, batch {a.batch_size}/rank), median of "
          f"{a.iters} alternating rounds: data parallel {med['none'] * 1e3:.0f} ms, --shard full "
          f"{med['full'] * 1e3:.0f} ms, ratio {ratio:.2f} (target <= {TARGET} at 10 Gbit/s); the full step's "
          f"gathers {med['gather'] * 1e3:.0f} ms + reduce-scatters {med['scatter'] * 1e3:.0f} ms alone = "
          f"{share:.0%} of it; sent per step per rank: data parallel {wire['none']['bytes_sent_per_step'] / 1e6:.0f} MB, "
          f"--shard full {wire['full']['bytes_sent_per_step'] / 1e6:.0f} MB", flush=True)
    print("SHARD_STEP_JSON " + json.dumps({"ranks": world, "link": link, "hidden": a.hidden, "depth": a.depth,
                                           "batch_size": a.batch_size, "iters": a.iters, "median_s": med,
                                           "ratio": ratio, "gather_scatter_share": share, "wire": wire,
                                           "times_s": times}), flush=True)


# ----------------------------------------------------------------------------- shaped links


def shaped_run(a: argparse.Namespace, rate: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.netns import NetnsCluster

    burst = tc_burst_bytes(rate, "--rates")
    with NetnsCluster(N, sshd=False) as cluster, tempfile.TemporaryDirectory(prefix="shard-step-") as tmp:
        ends = [(h.namespace, iface) for h in cluster.hosts for iface in (h.left_iface, h.right_iface)]
        try:
            for ns, iface in ends:
                subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", iface, "root", "tbf", "rate", rate,
                                "burst", str(burst), "latency", "100ms"], check=True, timeout=20)
            hostfile = Path(tmp) / "hostfile.json"
            hostfile.write_text(json.dumps([[f"{h.left_ip}:{47300 + h.index}"] for h in cluster.hosts]))
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--hidden", str(a.hidden), "--depth",
                    str(a.depth), "--batch-size", str(a.batch_size), "--iters", str(a.iters), "--warmup",
                    str(a.warmup)]
            outputs = ranks_on_hosts(cluster, argv, [{
                "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "ORCH_BACKEND": "ring", "ORCH_RUN_DIR": tmp,
                "SHARD_STEP_LINK": f"ring cables shaped to {rate} each way (tc tbf)", "PYTHONPATH": str(ROOT)}
                for rank in range(N)], tmp, a.timeout, f"{N} hosts at {rate}", tail=3000)
            print("\n".join(line for line in outputs[0].splitlines() if line.startswith("# ")), flush=True)
            return tagged_json(outputs[0], "SHARD_STEP_JSON")
        finally:
            clear_qdiscs(ends)


def main() -> None:
    a = parse_args(sys.argv[1:])
    if a.worker:
        worker(a)
        return
    results = [shaped_run(a, rate.strip()) for rate in a.rates.split(",") if rate.strip()]
    print(f"\n| link | data parallel ms | --shard full ms | ratio (target <= {TARGET} at 10 Gbit/s) | "
          "gather + scatter alone | share of the full step |")
    print("|---|---|---|---|---|---|")
    for r in results:
        m = r["median_s"]
        print(f"| {r['link']} | {m['none'] * 1e3:.0f} | {m['full'] * 1e3:.0f} | {r['ratio']:.2f}x | "
              f"{m['gather'] * 1e3:.0f} + {m['scatter'] * 1e3:.0f} ms | {r['gather_scatter_share']:.0%} |")
    result_line("shard_step_time", results=[{k: r[k] for k in ("link", "median_s", "ratio", "gather_scatter_share")}
                                            for r in results])


if __name__ == "__main__":
    main()
