"""Launch latency: `orch run` vs `mlx.launch`, and the controller's idle CPU.

    python benchmarks/launch_latency.py [--runs 7] [--ranks 2]

1. Median wall time of a trivial all_sum script (recipes/allsum_check.py) under
   `orch run -n N` and `mlx.launch -n N`, alternating in the same run so both
   see the same machine load. Prints the ratio orch / mlx.launch.
2. CPU time (user+sys) the launcher process itself uses during 10 s in which
   its N ranks sleep (start-up excluded; psutil on the launcher alone).
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


def controller_cpu(cmd: list[str], ranks: int, idle: float) -> float:
    """CPU seconds the launcher process alone uses while its ranks sleep (start-up excluded)."""
    import selectors

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
    try:
        proc = psutil.Process(p.pid)
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        seen, deadline = 0, time.monotonic() + 60
        while seen < ranks and time.monotonic() < deadline:
            if sel.select(1.0):
                line = p.stdout.readline()
                if not line:
                    break
                seen += "sleeping" in line
        if seen < ranks:
            raise SystemExit(f"{cmd[0]}: ranks never started sleeping")
        t = proc.cpu_times()
        before = t.user + t.system
        time.sleep(idle)
        t = proc.cpu_times()
        return t.user + t.system - before
    finally:
        # mlx.launch orphans its ranks when killed: collect them first, then end them by PID.
        try:
            descendants = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        p.kill()
        p.wait(timeout=30)
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(descendants, timeout=10)


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
        oc = controller_cpu(orch_cmd(SLEEPER, a.ranks, f"{tmp}/idle", str(a.idle + 30)), a.ranks, a.idle)
        mc = controller_cpu(mlx_cmd(SLEEPER, a.ranks, str(a.idle + 30)), a.ranks, a.idle)
        print(f"controller CPU during {a.idle:g} s while {a.ranks} ranks sleep")
        print(f"  orch run    {oc:.3f} s   (target < 0.1 s)")
        print(f"  mlx.launch  {mc:.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
