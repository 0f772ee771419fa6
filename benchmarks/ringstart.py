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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, count_check, ratio, result_line, summary, timed  # noqa: E402
from launch_latency import ALLSUM, ROOT, mlx_cmd, orch_cmd  # noqa: E402

from orchestrator import protocol  # noqa: E402

VARIANTS = {
    "orch (gate + hold)": {},
    "orch, no hold": {protocol.ENV_HOLD_MAX_S: "0"},
    "orch, no gate, no hold": {protocol.ENV_HOLD_MAX_S: "0", protocol.ENV_GATE_TIMEOUT: "0"},
}


def launch(cmd: list[str], ranks: int, extra_env: dict[str, str], cwd: Path = ROOT) -> float:
    """Wall time of one launch that really succeeded (every rank printed OK)."""
    return timed(cmd, check=count_check(" OK", ranks), what=cmd[0], cwd=cwd, env={**os.environ, **extra_env},
                 timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--baseline", type=Path, help="another checkout of orch to time in the same rounds")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="orch-ringstart-")
    try:
        baseline = f"orch at {a.baseline}" if a.baseline else None
        arms = {}
        for j, (name, env) in enumerate(VARIANTS.items()):
            arms[name] = lambda i, j=j, env=env: launch(orch_cmd(ALLSUM, a.ranks, f"{tmp}/r{i}-{j}"), a.ranks, env)
        if baseline:
            arms[baseline] = lambda i: launch(orch_cmd(ALLSUM, a.ranks, f"{tmp}/b{i}"), a.ranks, {}, cwd=a.baseline)
        arms["mlx.launch"] = lambda i: launch(mlx_cmd(ALLSUM, a.ranks), a.ranks, {})
        launch(orch_cmd(ALLSUM, a.ranks, f"{tmp}/warm"), a.ranks, {})  # warm the page cache for both
        launch(mlx_cmd(ALLSUM, a.ranks), a.ranks, {})
        times = alternate(arms, a.runs)
        print(f"ring start, {a.ranks} ranks, {a.runs} rounds (each round runs every launcher in turn)")
        for name, ts in times.items():
            s = summary(ts)
            slow = sum(t > s.min + 0.5 for t in ts)
            print(f"  {name:28s} median {s.median:.3f} s  mean {s.mean:.3f} s  "
                  f"(min {s.min:.3f}, max {s.max:.3f}; {slow}/{len(ts)} runs > min + 0.5 s)  "
                  f"median / mlx.launch's {ratio(ts, times['mlx.launch']):.2f}")
        result_line("ringstart", ranks=a.ranks, runs=a.runs, times=times,
                    ratio_to_median={k: ratio(ts, times["mlx.launch"]) for k, ts in times.items()},
                    ratio_to_min={k: ratio(ts, times["mlx.launch"], to="min") for k, ts in times.items()},
                    cpus=os.cpu_count())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
