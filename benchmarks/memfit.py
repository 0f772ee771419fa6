"""Memory plan: the peak each rank predicts before its first step vs the peak it then reaches.

    python benchmarks/memfit.py [--steps 6]

``orch run recipes/mlp_regression.py -n 2`` at a few model widths and batch
sizes (Adam), reading ``summary.json``: per rank the memory plan made from two
probe steps at 1/8 and 1/4 of the batch (``memory_plan``) next to what the run
measured (``memory``: RSS and MLX peaks sampled every step). The last row gives
the host a ``memory_gb`` in a hostfile that is too small for the batch, with
``--fit-memory``: each rank splits its batch into pieces, and its measured peak
must stay under its budget. Ratios > 1 mean the plan erred on the safe side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "recipes" / "mlp_regression.py"
MiB = 2**20

CONFIGS = [  # (hidden, per-rank batch, memory_gb for the host or None)
    (256, 512, None),
    (1024, 1024, None),
    (1024, 4096, None),
    (2048, 2048, None),
    (1024, 4096, 0.35),
]


def run(tmp: Path, hidden: int, batch: int, memory_gb, steps: int) -> dict:
    run_dir = tmp / f"h{hidden}-b{batch}-{memory_gb}"
    args = ["--hidden", str(hidden), "--batch-size", str(batch), "--samples", str(4 * batch), "--steps", str(steps),
            "--optimizer", "adam", "--stats-every", "1"]
    where = ["-n", "2"]
    if memory_gb:
        hosts = tmp / "hosts.json"
        hosts.write_text(json.dumps({"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"], "slots": 2,
                                                "memory_gb": memory_gb}]}))
        where = ["--hostfile", str(hosts)]
        args.append("--fit-memory")
    cmd = [sys.executable, "-m", "orchestrator", "run", str(MLP), *where, "--run-dir", str(run_dir), "--", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"memfit.py: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    print("| hidden | batch/rank | budget | micro x pieces | predicted peak | measured RSS peak | predicted/measured "
          "| predicted MLX peak | measured MLX peak | predicted/measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="memfit-bench-") as tmp:
        for hidden, batch, gb in CONFIGS:
            s = run(Path(tmp), hidden, batch, gb, a.steps)
            for r in s["ranks"][:1] if not gb else s["ranks"]:
                p, m = r["memory_plan"], r["memory"]
                budget = f"{p['budget_bytes'] / MiB:,.0f} MiB ({p['budget_source']})"
                print(f"| {hidden} | {batch} | {budget} | {p['micro_batch']} x {p['pieces']} "
                      f"| {p['predicted_peak_bytes'] / MiB:,.0f} MiB | {m['rss_peak_bytes'] / MiB:,.0f} MiB "
                      f"| {p['predicted_peak_bytes'] / m['rss_peak_bytes']:.2f} "
                      f"| {p['predicted_mlx_peak_bytes'] / MiB:,.1f} MiB | {m['mlx_peak_bytes'] / MiB:,.1f} MiB "
                      f"| {p['predicted_mlx_peak_bytes'] / m['mlx_peak_bytes']:.2f} |", flush=True)
                if gb:
                    assert m["rss_peak_bytes"] <= p["budget_bytes"], "the planned run went over its budget"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
