"""Gradients on the wire in float32 vs bfloat16: all-reduce time and step time, in the same run.

Two ways to run it:

    # 2 local ranks, loopback (unshaped):
    orch run benchmarks/grad_dtype.py -n 2 -- [--hidden 1536 --depth 4 --iters 10]

    # 2 network-namespace "hosts" joined by a veth link shaped with tc (root, Linux):
    python benchmarks/grad_dtype.py --netns 1gbit,10gbit [--hidden 1536 --depth 4 --iters 10]

Every rank builds the runtime's own ``Trainer`` on ``bench_mlp``'s MLP (the
default 1536x4 has 7.2 M parameters: 28.7 MB of float32 gradients) and two
``gradcomm.GradientAverager``s, float32 and bfloat16. Each iteration runs,
for both wire dtypes in an order that alternates:

* ``all-reduce``: the averager alone on one fixed set of real gradients;
* ``step``: a whole ``Trainer.train_step`` (forward, backward, all-reduce,
  Adam update, eval) with that averager.

Each timing starts after a barrier so a late rank's wait is not counted.
Rank 0 prints a table of medians and ``float32 / bfloat16`` ratios and one
``GRAD_DTYPE_JSON {...}`` line. With ``--netns`` the script itself starts
both ranks inside two namespaces (``tests/netns.py``, no sshd), puts a ``tbf``
qdisc of the given rate on both ends of the link the ring uses, and removes
the qdiscs and the namespaces in ``finally``.
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

from harness import clear_qdiscs, ranks_on_hosts, tagged_json, tc_burst_bytes

ROOT = Path(__file__).resolve().parent.parent
WIRES = ("float32", "bfloat16")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="the trainer's default (runtime/allocator.py); --no-keep-freed-memory: glibc as it comes")
    ap.add_argument("--shard-optimizer", action="store_true",
                    help="the trainer with --shard-optimizer (ZeRO-1): each step adds the all_gather of the "
                         "updated parameters; rank 0 also reports its optimizer state and MLX peak memory")
    ap.add_argument("--netns", default="", help="comma-separated tc rates (e.g. 1gbit,10gbit): run on shaped veth")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per shaped run before its ranks are killed")
    return ap.parse_args(argv[1:] if argv[:1] == ["--"] else argv)


# ----------------------------------------------------------------------------- one rank


def worker(a: argparse.Namespace) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import bench_mlp
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from orchestrator.runtime.config import parse_hparams
    from orchestrator.runtime.gradcomm import GradientAverager
    from orchestrator.runtime.trainer import Trainer, init_group

    group = init_group()
    rank, world = group.rank(), group.size()
    if world < 2:
        sys.exit("run with 2+ ranks: orch run benchmarks/grad_dtype.py -n 2 (or --netns RATE)")
    hp = parse_hparams(bench_mlp.Config, ["--hidden", str(a.hidden), "--depth", str(a.depth), "--batch-size",
                                          str(a.batch_size), "--steps", "1", "--stats-every", "0"]
                      + ([] if a.keep_freed_memory else ["--no-keep-freed-memory"])
                      + (["--shard-optimizer"] if a.shard_optimizer else []))
    tr = Trainer(bench_mlp.recipe, hp, group, "grad_dtype")
    averagers = {w: GradientAverager(group, w) for w in WIRES}
    _, micro = tr.sampler.next_step()
    loss, grads = tr.loss_and_grad(tr.model, *tr._batch(micro[0]))
    mx.eval(loss, grads)
    grad_bytes = sum(g.nbytes for _, g in tree_flatten(grads))

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    n_elems = sum(g.size for _, g in tree_flatten(grads))
    raw = {w: mx.ones((n_elems,), dtype=getattr(mx, w)) for w in WIRES}
    mx.eval(raw)
    times: dict[str, dict[str, list[float]]] = {w: {"allreduce": [], "step": [], "raw": []} for w in WIRES}
    for it in range(a.warmup + a.iters):
        for w in (WIRES if it % 2 == 0 else WIRES[::-1]):
            barrier()  # the floor: one all_sum of a ready buffer of the same element count, no cast, no split
            t0 = time.perf_counter()
            mx.eval(mx.distributed.all_sum(raw[w], group=group))
            t_raw = time.perf_counter() - t0
            barrier()
            t0 = time.perf_counter()
            mx.eval(averagers[w](grads, loss))
            t_ar = time.perf_counter() - t0
            tr.averager = averagers[w]
            barrier()
            t0 = time.perf_counter()
            tr.train_step()
            t_step = time.perf_counter() - t0
            if it >= a.warmup:
                times[w]["allreduce"].append(t_ar)
                times[w]["step"].append(t_step)
                times[w]["raw"].append(t_raw)
    if rank != 0:
        return
    med = {w: {k: statistics.median(v) for k, v in times[w].items()} for w in WIRES}
    link = os.environ.get("GRAD_DTYPE_LINK", "loopback (unshaped)")
    print(f"# {world} ranks over {link}: {grad_bytes / 1e6:.1f} MB of float32 gradients "
          f"({a.hidden}x{a.depth} MLP, batch {a.batch_size}/rank), median of {a.iters} alternating rounds")
    print("| wire dtype | raw all_sum ms | all-reduce ms | step ms |")
    print("|---|---|---|---|")
    for w in WIRES:
        print(f"| {w} | {med[w]['raw'] * 1e3:.1f} | {med[w]['allreduce'] * 1e3:.1f} | {med[w]['step'] * 1e3:.1f} |")
    memory = {"optimizer_state_bytes": tr.optimizer_state_bytes(), "mlx_peak_bytes": int(mx.get_peak_memory()),
              "shard_optimizer": a.shard_optimizer}
    print(f"optimizer: Adam{' sharded (--shard-optimizer)' if a.shard_optimizer else ''}; state on rank 0 "
          f"{memory['optimizer_state_bytes'] / 2**20:.1f} MiB, MLX peak {memory['mlx_peak_bytes'] / 2**20:.1f} MiB")
    ratio = {k: med["float32"][k] / med["bfloat16"][k] for k in ("raw", "allreduce", "step")}
    print(f"float32 / bfloat16: raw all_sum {ratio['raw']:.2f}x, all-reduce {ratio['allreduce']:.2f}x, "
          f"step {ratio['step']:.2f}x")
    print("GRAD_DTYPE_JSON " + json.dumps({"link": link, "grad_bytes": grad_bytes, "median_s": med, "ratio": ratio,
                                           "iters": a.iters, "hidden": a.hidden, "depth": a.depth, **memory}), flush=True)


# ----------------------------------------------------------------------------- shaped links


def shaped_run(a: argparse.Namespace, rate: str) -> dict:
    """Both ranks in two namespaces over one tbf-shaped veth link; returns rank 0's JSON."""
    sys.path.insert(0, str(ROOT))
    from tests.netns import NetnsCluster

    burst = tc_burst_bytes(rate, "--netns")
    with NetnsCluster(2, sshd=False) as cluster, tempfile.TemporaryDirectory(prefix="grad-dtype-") as tmp:
        (h0, if0), (h1, if1) = cluster.link_ends(0)
        ends = [(cluster.namespaces[h0], if0), (cluster.namespaces[h1], if1)]
        try:
            for ns, iface in ends:
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", iface, "root", "tbf", "rate", rate,
                                "burst", str(burst), "latency", "100ms"], check=True, timeout=20)
            ips = [cluster.hosts[0].right_ip, cluster.hosts[1].left_ip]  # both ends of link 0
            hostfile = Path(tmp) / "hostfile.json"
            hostfile.write_text(json.dumps([[f"{ip}:{47000 + i}"] for i, ip in enumerate(ips)]))
            argv = [sys.executable, str(Path(__file__).resolve()), "--hidden", str(a.hidden), "--depth",
                    str(a.depth), "--batch-size", str(a.batch_size), "--iters", str(a.iters), "--warmup",
                    str(a.warmup)] + ([] if a.keep_freed_memory else ["--no-keep-freed-memory"]) \
                + (["--shard-optimizer"] if a.shard_optimizer else [])
            outputs = ranks_on_hosts(cluster, argv, [{
                "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "ORCH_BACKEND": "ring", "ORCH_RUN_DIR": tmp,
                "GRAD_DTYPE_LINK": f"veth shaped to {rate} (tc tbf)", "PYTHONPATH": str(ROOT)}
                for rank in range(2)], tmp, a.timeout, f"shaped run at {rate}", tail=3000)
            print("\n".join(line for line in outputs[0].splitlines() if not line.startswith("GRAD_DTYPE_JSON")),
                  flush=True)
            return tagged_json(outputs[0], "GRAD_DTYPE_JSON")
        finally:
            clear_qdiscs(ends)


def main() -> None:
    a = parse_args(sys.argv[1:])
    if not a.netns:
        worker(a)
        return
    results = [shaped_run(a, rate.strip()) for rate in a.netns.split(",") if rate.strip()]
    print("\n| link | raw all_sum f32/bf16 | all-reduce f32/bf16 | step f32/bf16 |")
    print("|---|---|---|---|")
    for r in results:
        q = r["ratio"]
        print(f"| {r['link']} | {q['raw']:.2f}x | {q['allreduce']:.2f}x | {q['step']:.2f}x |")


if __name__ == "__main__":
    main()
