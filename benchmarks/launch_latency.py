"""Launch latency: `orch run` vs `mlx.launch`, and the controller's idle CPU.

    python benchmarks/launch_latency.py [--runs 7] [--ranks 2[,8,...]]

For each rank count N in ``--ranks``:

1. Median wall time of a trivial all_sum script (recipes/allsum_check.py) under
   `orch run -n N` and `mlx.launch -n N`, alternating in the same run so both
   see the same machine load (benchmarks/harness.py). Prints the ratio of orch's
   median to mlx.launch's median, and to mlx.launch's minimum: mlx.launch's
   best run is the one that escaped its 1 s connect back-off, what a launch
   costs when nothing waits (issue 23's target: orch's median <= 1.3x it).
2. CPU time (user+sys) the launcher process itself uses during 10 s in which
   its N ranks sleep (start-up excluded; psutil on the launcher alone).

Both launchers run with Python's bytecode caches, as on a user's machine: a
``PYTHONDONTWRITEBYTECODE`` in this environment (some containers set it) is
dropped for them, and the warm-up runs write the caches. Without them every
launch compiled orch's and pydantic's sources again (~50 ms).

One ``RESULT {json}`` line per N at the end, for RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, alternate, count_check, ratio, result_line, summary, timed  # noqa: E402

ALLSUM = ROOT / "recipes" / "allsum_check.py"
SLEEPER = ROOT / "tests" / "scripts" / "sleeper.py"


def orch_cmd(script: Path, n: int, run_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", str(script), "-n", str(n), "--run-dir", run_dir, "--", *args]


def mlx_cmd(script: Path, n: int, *args: str) -> list[str]:
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        sys.exit("mlx.launch not found on PATH (pip install mlx)")
    return [launcher, "-n", str(n), "--python", sys.executable, str(script), *args]


# What a user's shell has: bytecode caches written and read (see the module docstring).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def launch(cmd: list[str], ranks: int) -> float:
    """Wall time of one launch; the run must really have succeeded (mlx.launch exits 0 on failures)."""
    return timed(cmd, check=count_check(" OK", ranks), what=cmd[0], timeout=120, env=ENV)


def controller_cpu(cmd: list[str], ranks: int, idle: float) -> float:
    """CPU seconds the launcher process alone uses while its ranks sleep (start-up excluded)."""
    import selectors

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True, env=ENV)
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


def rank_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: give rank counts like 2 or 2,8")
    return counts


def measure(ranks: int, runs: int, idle: float, tmp: str) -> dict:
    launch(orch_cmd(ALLSUM, ranks, f"{tmp}/warm{ranks}"), ranks)  # warm the page cache for both
    launch(mlx_cmd(ALLSUM, ranks), ranks)
    times = alternate({
        "orch run": lambda i: launch(orch_cmd(ALLSUM, ranks, f"{tmp}/o{ranks}-{i}"), ranks),
        "mlx.launch": lambda i: launch(mlx_cmd(ALLSUM, ranks), ranks),
    }, runs)
    o, m = summary(times["orch run"]), summary(times["mlx.launch"])
    to_median, to_min = ratio(times["orch run"], times["mlx.launch"]), ratio(times["orch run"], times["mlx.launch"], to="min")
    print(f"launch latency, {ranks} ranks, {runs} runs each (alternating)")
    print(f"  orch run    median {o.median:.3f} s  (min {o.min:.3f}, max {o.max:.3f})")
    print(f"  mlx.launch  median {m.median:.3f} s  (min {m.min:.3f}, max {m.max:.3f})")
    print(f"  ratio orch / mlx.launch = {to_median:.2f}  (target <= 0.5)")
    print(f"  ratio orch median / mlx.launch min = {to_min:.2f}  (target <= 1.3)", flush=True)
    oc = controller_cpu(orch_cmd(SLEEPER, ranks, f"{tmp}/idle{ranks}", str(idle + 30)), ranks, idle)
    mc = controller_cpu(mlx_cmd(SLEEPER, ranks, str(idle + 30)), ranks, idle)
    print(f"controller CPU during {idle:g} s while {ranks} ranks sleep")
    print(f"  orch run    {oc:.3f} s   (target < 0.1 s)")
    print(f"  mlx.launch  {mc:.3f} s", flush=True)
    return {"ranks": ranks, "runs": runs, "orch_s": times["orch run"], "mlx_launch_s": times["mlx.launch"],
            "median_orch_s": o.median, "median_mlx_launch_s": m.median, "min_mlx_launch_s": m.min,
            "ratio_to_median": to_median, "ratio_to_min": to_min,
            "idle_cpu_orch_s": oc, "idle_cpu_mlx_launch_s": mc, "idle_s": idle, "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ranks", type=rank_counts, default=[2], help="rank count(s), comma-separated (default 2)")
    ap.add_argument("--idle", type=float, default=10.0)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="orch-bench-")
    try:
        results = []
        for ranks in a.ranks:
            results.append(measure(ranks, a.runs, a.idle, tmp))
        for res in results:
            result_line("launch_latency", **res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
