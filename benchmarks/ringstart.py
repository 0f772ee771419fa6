"""What the ring start buys: `orch run -n N` with the gate and the hold, without the hold, without either.

    python benchmarks/ringstart.py [--runs 9] [--ranks 2]

Each round runs, in turn, a trivial all_sum (recipes/allsum_check.py) under

* ``orch``: as shipped (rank N-1 gated until every other rank listens, rank 0
  held in accept() until rank N-1 listens; orchestrator/ringstart.py);
* ``orch, no hold``: ``ORCH_HOLD_MAX_S=0`` (the hold ends the moment it starts);
* ``orch, no gate, no hold``: also ``ORCH_GATE_TIMEOUT=0`` (the gated rank does not wait);
* ``mlx.launch -n N``: the anchor,

so all four see the same machine load. ``--baseline DIR`` adds a fifth: orch
as shipped from another checkout (e.g. ``git worktree add /tmp/base REF``), run
from that directory so it and its ranks import that code. Prints medians, means (a launch either
loses MLX's 1 s retry or not: the mean shows how often) and each median's ratio
to mlx.launch's. The simpler mechanisms are what the ring start would be without
its parts: if one of them matched the full one, the part it drops would not
be paying for itself.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_latency import ALLSUM, ROOT, mlx_cmd, orch_cmd  # noqa: E402

from orchestrator import protocol  # noqa: E402

VARIANTS = {
    "orch (gate + hold)": {},
    "orch, no hold": {protocol.ENV_HOLD_MAX_S: "0"},
    "orch, no gate, no hold": {protocol.ENV_HOLD_MAX_S: "0", protocol.ENV_GATE_TIMEOUT: "0"},
}


def timed(cmd: list[str], ranks: int, extra_env: dict[str, str], cwd: Path = ROOT) -> float:
    """Wall time of one launch that really succeeded (every rank printed OK)."""
    env = {**os.environ, **extra_env}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, timeout=120, cwd=cwd, env=env)
    dt = time.perf_counter() - t0
    oks = r.stdout.decode().count(" OK")
    if r.returncode != 0 or oks != ranks:
        raise SystemExit(f"{cmd[0]} failed (rc {r.returncode}, {oks}/{ranks} OK): {r.stderr.decode()[-800:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--baseline", type=Path, help="another checkout of orch to time in the same rounds")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="orch-ringstart-")
    try:
        baseline = f"orch at {a.baseline}" if a.baseline else None
        times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, *([baseline] if baseline else []), "mlx.launch"]}
        timed(orch_cmd(ALLSUM, a.ranks, f"{tmp}/warm"), a.ranks, {})  # warm the page cache for both
        timed(mlx_cmd(ALLSUM, a.ranks), a.ranks, {})
        for i in range(a.runs):
            for j, (name, env) in enumerate(VARIANTS.items()):
                times[name].append(timed(orch_cmd(ALLSUM, a.ranks, f"{tmp}/r{i}-{j}"), a.ranks, env))
            if baseline:
                times[baseline].append(timed(orch_cmd(ALLSUM, a.ranks, f"{tmp}/b{i}"), a.ranks, {}, cwd=a.baseline))
            times["mlx.launch"].append(timed(mlx_cmd(ALLSUM, a.ranks), a.ranks, {}))
        anchor = statistics.median(times["mlx.launch"])
        print(f"ring start, {a.ranks} ranks, {a.runs} rounds (each round runs every launcher in turn)")
        for name, ts in times.items():
            slow = sum(t > min(ts) + 0.5 for t in ts)
            print(f"  {name:28s} median {statistics.median(ts):.3f} s  mean {statistics.mean(ts):.3f} s  "
                  f"(min {min(ts):.3f}, max {max(ts):.3f}; {slow}/{len(ts)} runs > min + 0.5 s)  "
                  f"median / mlx.launch's {statistics.median(ts) / anchor:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
