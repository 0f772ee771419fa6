"""The controller's floor: the serial work every `orch run -n N` pays before it can end, beside mlx.launch's best.

    python benchmarks/controller_floor.py [--runs 15]

Issue 23 asks for orch's median local launch to be at most 1.3x `mlx.launch`'s
*minimum*. Whatever overlaps with the ranks, one process must start Python, import
asyncio (the supervisor's event loop) and pydantic (the models at the edges: the
events' validator, summary.json), import orch's own modules, and then run. This
script measures each of those in a fresh interpreter, `--runs` times, and prints
their medians beside `mlx.launch -n 2`'s minimum of a trivial all_sum, in the same
run. When interpreter + asyncio + pydantic alone come near 1.3x that minimum, no
reordering of the launch can meet the target: only a controller that imports
neither.

Each import is timed after the ones before it (what the run path loads first;
``pydantic`` is what orch's models use of it: ``BaseModel``, ``Field``, validators),
with bytecode caches as on a user's machine (``PYTHONDONTWRITEBYTECODE`` dropped).
One ``RESULT {json}`` line at the end, for RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, count_check, result_line, timed  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), ENV.get("PYTHONPATH")) if p)

# What the run path imports, in its order; each step is timed after the ones before it.
STEPS = """
import time
t = [time.perf_counter()]
import argparse, subprocess, json; t.append(time.perf_counter())
import orchestrator.cli; t.append(time.perf_counter())
import asyncio; t.append(time.perf_counter())
import pydantic; from pydantic import BaseModel, Field, field_validator; t.append(time.perf_counter())
import orchestrator.run.driver, orchestrator.supervisor; t.append(time.perf_counter())
print(" ".join(f"{b - a:.6f}" for a, b in zip(t, t[1:])))
"""
NAMES = ["stdlib", "orch_cli", "asyncio", "pydantic", "orch_run_modules"]


def interpreter_start() -> float:
    """Wall time of `python -c pass` (with site, as the `orch` command starts)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=ENV, check=True)
    return time.perf_counter() - t


def imports() -> list[float]:
    out = subprocess.run([sys.executable, "-c", STEPS], env=ENV, check=True, capture_output=True, text=True, cwd=ROOT)
    return [float(x) for x in out.stdout.split()]


def mlx_launch() -> float:
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        sys.exit("mlx.launch not found on PATH (pip install mlx)")
    cmd = [launcher, "-n", "2", "--python", sys.executable, str(ROOT / "recipes" / "allsum_check.py")]
    return timed(cmd, check=count_check(" OK", 2), what="mlx.launch", timeout=120, env=ENV)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    imports()  # writes the bytecode caches
    starts, steps, anchor = [], [], []
    for _ in range(args.runs):
        starts.append(interpreter_start())
        steps.append(imports())
        anchor.append(mlx_launch())
    med = {"interpreter": statistics.median(starts)}
    med.update({name: statistics.median(s[k] for s in steps) for k, name in enumerate(NAMES)})
    floor = med["interpreter"] + med["asyncio"] + med["pydantic"]
    best = min(anchor)
    for name, v in med.items():
        print(f"{name:>18}: {1000 * v:7.1f} ms (median of {args.runs})")
    print(f"{'all of the above':>18}: {1000 * sum(med.values()):7.1f} ms")
    print(f"mlx.launch -n 2 min: {1000 * best:7.1f} ms; 1.3x of it: {1300 * best:.1f} ms")
    print(f"interpreter + asyncio + pydantic = {1000 * floor:.1f} ms = {floor / best:.2f}x mlx.launch's minimum")
    result_line("controller_floor", **{k: round(v, 4) for k, v in med.items()}, mlx_launch_min_s=round(best, 4),
                floor_over_anchor_min=round(floor / best, 3), runs=args.runs, cpus=os.cpu_count())


if __name__ == "__main__":
    main()
