"""all_sum throughput, MPI vs ring, 2 local ranks, same run (alternating), sizes 1/16/64/256 MiB.

    python benchmarks/mpi_vs_ring.py [--repeats 3]

Both backends are launched by `orch run` (same run directory layout, same script:
benchmarks/allsum_sizes.py); the table gives the median time per all_sum and the
algorithm bandwidth (bytes / time), and the ratio ring / MPI throughput.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def once(backend: str, run_dir: str, sizes: str, iters: int) -> dict:
    cmd = [sys.executable, "-m", "orchestrator", "run", str(ROOT / "benchmarks" / "allsum_sizes.py"), "-n", "2",
           "--backend", backend, "--run-dir", run_dir, "--", "--sizes-mib", sizes, "--iters", str(iters)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    m = re.search(r"ALLSUM (\{.*\})", r.stdout)
    if r.returncode != 0 or not m:
        raise SystemExit(f"{backend} failed ({r.returncode}):\n{r.stderr[-1500:]}")
    return {int(k): v for k, v in json.loads(m.group(1))["seconds"].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes-mib", default="1,16,64,256")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    results = {"ring": [], "mpi": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for backend in ("ring", "mpi") if i % 2 == 0 else ("mpi", "ring"):
                results[backend].append(once(backend, f"{tmp}/{backend}{i}", a.sizes_mib, a.iters))
    print(f"all_sum, 2 local ranks, median of {a.repeats} runs x {a.iters} iterations (alternating)")
    print("| size | ring ms | ring GB/s | MPI ms | MPI GB/s | ring/MPI throughput |")
    print("|---|---|---|---|---|---|")
    for mib in [int(x) for x in a.sizes_mib.split(",")]:
        r = statistics.median(x[mib] for x in results["ring"])
        m = statistics.median(x[mib] for x in results["mpi"])
        gb = mib * 2**20 / 1e9
        print(f"| {mib} MiB | {r * 1e3:.1f} | {gb / r:.2f} | {m * 1e3:.1f} | {gb / m:.2f} | {m / r:.2f} |")


if __name__ == "__main__":
    main()
