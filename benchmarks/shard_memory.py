"""Each rank's MLX peak per sharding stage: data parallel vs ``--shard optimizer`` vs ``--shard full``.

    python benchmarks/shard_memory.py [-n 4] [--hidden 2048 --depth 8] [--steps 3]

Runs ``benchmarks/bench_mlp.py`` (Adam; the default 2048x8 MLP has 29.5 M parameters, 118 MB) under
``orch run -n N`` once per stage, on one machine, and reads every rank's MLX peak from the run's
``summary.json``: the trainer resets the peak after its memory probes, so it is training's own (the
whole model that ``recipe.build`` makes before sharding is not counted). Prints per stage the largest
rank peak, its ratio to data parallelism's (target for ``--shard full`` at N=4: <= 0.35), the median
step time and what a step puts on the wire, and one ``SHARD_MEMORY_JSON {...}`` line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.35


def run_stage(stage: str, a: argparse.Namespace, tmp: Path) -> dict:
    run_dir = tmp / stage
    argv = [sys.executable, "-m", "orchestrator", "run", str(ROOT / "benchmarks" / "bench_mlp.py"), "-n", str(a.n),
            "--run-dir", str(run_dir), "--", "--hidden", str(a.hidden), "--depth", str(a.depth),
            "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--stats-every", "1", "--shard", stage]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        raise SystemExit(f"--shard {stage} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    peaks = [r["memory"]["mlx_peak_bytes"] for r in summary["ranks"]]
    steps = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
             if '"kind": "step"' in line or '"kind":"step"' in line]
    times = sorted(e["step_time_s"] for e in steps if e.get("rank") == 0)
    rank0 = summary.get("metrics") or {}  # rank 0's end-of-run metrics
    return {"stage": stage, "peaks": peaks, "max_peak": max(peaks), "step_s": times[len(times) // 2] if times else None,
            "bytes_sent_per_step": rank0.get("bytes_sent_per_step"),
            "optimizer_state_bytes": rank0.get("optimizer_state_bytes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--stages", default="none,optimizer,full")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    params = 64 * a.hidden + a.hidden + (a.depth - 1) * (a.hidden * a.hidden + a.hidden) + a.hidden + 1
    with tempfile.TemporaryDirectory(prefix="shard-memory-") as tmp:
        results = [run_stage(s.strip(), a, Path(tmp)) for s in a.stages.split(",") if s.strip()]
    base = next((r["max_peak"] for r in results if r["stage"] == "none"), None)
    print(f"# {a.n} ranks, MLP {a.hidden}x{a.depth} ({params / 1e6:.1f} M parameters, {params * 4 / 1e6:.0f} MB "
          f"float32), Adam, batch {a.batch_size}/rank, {a.steps} steps, one machine")
    print(f"| --shard | MLX peak per rank (max of {a.n}) | vs data parallel | step (rank 0, median) | "
          "bytes sent per step per rank | optimizer state per rank |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['max_peak'] / base:.2f}x" if base else "-"
        step = f"{r['step_s'] * 1e3:.0f} ms" if r["step_s"] else "-"
        sent = f"{r['bytes_sent_per_step'] / 1e6:.0f} MB" if r["bytes_sent_per_step"] is not None else "-"
        state = f"{r['optimizer_state_bytes'] / 1e6:.0f} MB" if r["optimizer_state_bytes"] is not None else "-"
        print(f"| {r['stage']} | {r['max_peak'] / 2**20:.0f} MiB | {ratio} | {step} | {sent} | {state} |")
    full = next((r for r in results if r["stage"] == "full"), None)
    if full and base:
        print(f"--shard full / data parallel MLX peak: {full['max_peak'] / base:.2f} (target <= {TARGET})")
    print("SHARD_MEMORY_JSON " + json.dumps({"n": a.n, "hidden": a.hidden, "depth": a.depth, "params": params,
                                             "results": results}))


if __name__ == "__main__":
    main()
