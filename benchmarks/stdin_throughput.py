"""``orch run --stdin rank0``: how fast orch's stdin reaches a rank, against the same program reading it directly.

The same input file (``--mib`` MiB of random bytes) is read by
tests/scripts/stdin_digest.py, alternating: directly (``python digest < file``,
the anchor) and as rank 0 of ``orch run -n 1 --stdin rank0`` (relay thread,
base64 control lines, the guard's pipe). Reports the median wall time of each,
the forwarding rate, and the ratio. Start-up is included in both, so small
inputs mostly measure orch's start.

    python benchmarks/stdin_throughput.py --mib 64 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGEST = ROOT / "tests" / "scripts" / "stdin_digest.py"


def timed(argv: list[str], data_path: Path, cwd: Path) -> tuple[float, str]:
    with open(data_path, "rb") as f:
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdin=f, capture_output=True, text=True, cwd=cwd, timeout=600)
        dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({r.returncode}): {r.stderr[-500:]}")
    return dt, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "input.bin"
        data.write_bytes(os.urandom(a.mib << 20))
        want = hashlib.sha256(data.read_bytes()).hexdigest()
        direct, orch = [], []
        for i in range(a.repeat):
            dt, out = timed([sys.executable, str(DIGEST)], data, tmp)
            assert want in out, out
            direct.append(dt)
            dt, out = timed([sys.executable, "-m", "orchestrator", "run", "-n", "1", "--stdin", "rank0", "--quiet",
                             "--run-dir", str(tmp / f"run{i}"), str(DIGEST)], data, tmp)
            assert want in (tmp / f"run{i}" / "logs" / "rank-0.log").read_text()
            orch.append(dt)
        d, o = statistics.median(direct), statistics.median(orch)
        print(f"{a.mib} MiB, median of {a.repeat}: direct {d:.2f}s, orch --stdin rank0 {o:.2f}s "
              f"({a.mib / o:.0f} MiB/s through orch), ratio {o / d:.2f}x")


if __name__ == "__main__":
    main()
