"""Launch latency: `orch run` vs `mlx.launch`, and the controller's idle CPU.

    python benchmarks/launch_latency.py [--runs 7] [--ranks 2]

1. Median wall time of a trivial all_sum script (recipes/allsum_check.py) under
   `orch run -n N` and `mlx.launch -n N`, alternating in the same run so both
   see the same machine load. Prints the ratio orch / mlx.launch.
2. CPU time (user+sys) the controller itself uses while N ranks sleep 10 s,
   for both launchers (psutil on the launcher process only, not its children).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
ALLSUM = ROOT / "recipes" / "allsum_check.py"
SLEEPER = ROOT / "tests" / "scripts" / "sleeper.py"


def orch_cmd(script: Path, n: int, run_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", str(script), "-n", str(n), "--run-dir", run_dir, "--", *args]


def mlx_cmd(script: Path, n: int, *args: str) -> list[str]:
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        sys.exit("mlx.launch not found on PATH (pip install mlx)")
    return [launcher, "-n", str(n), "--python", sys.executable, str(script), *args]


def timed(cmd: list[str], ranks: int) -> float:
    """Wall time of one launch; the run must really have succeeded (mlx.launch exits 0 on failures)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, timeout=120, cwd=ROOT)
    dt = time.perf_counter() - t0
    oks = r.stdout.decode().count(" OK")
    if r.returncode != 0 or oks != ranks:
        raise SystemExit(f"{cmd[0]} failed (rc {r.returncode}, {oks}/{ranks} OK): {r.stderr.decode()[-800:]}")
    return dt


def controller_cpu(cmd: list[str]) -> float:
    """CPU seconds of the launcher process alone over its whole life."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    proc = psutil.Process(p.pid)
    cpu = 0.0
    while p.poll() is None:
        try:
            t = proc.cpu_times()
            cpu = t.user + t.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    p.wait(timeout=60)
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--idle", type=float, default=10.0)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="orch-bench-")
    try:
        orch_t, mlx_t = [], []
        timed(orch_cmd(ALLSUM, a.ranks, f"{tmp}/warm"), a.ranks)  # warm the page cache for both
        timed(mlx_cmd(ALLSUM, a.ranks), a.ranks)
        for i in range(a.runs):
            orch_t.append(timed(orch_cmd(ALLSUM, a.ranks, f"{tmp}/o{i}"), a.ranks))
            mlx_t.append(timed(mlx_cmd(ALLSUM, a.ranks), a.ranks))
        mo, mm = statistics.median(orch_t), statistics.median(mlx_t)
        print(f"launch latency, {a.ranks} ranks, {a.runs} runs each (alternating)")
        print(f"  orch run    median {mo:.3f} s  (min {min(orch_t):.3f}, max {max(orch_t):.3f})")
        print(f"  mlx.launch  median {mm:.3f} s  (min {min(mlx_t):.3f}, max {max(mlx_t):.3f})")
        print(f"  ratio orch / mlx.launch = {mo / mm:.2f}  (target <= 0.5)")
        oc = controller_cpu(orch_cmd(SLEEPER, a.ranks, f"{tmp}/idle", str(a.idle)))
        mc = controller_cpu(mlx_cmd(SLEEPER, a.ranks, str(a.idle)))
        print(f"controller CPU while {a.ranks} ranks sleep {a.idle:g} s")
        print(f"  orch run    {oc:.3f} s   (target < 0.1 s)")
        print(f"  mlx.launch  {mc:.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
