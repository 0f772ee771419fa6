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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, alternate, ratio, result_line, summary, timed  # noqa: E402

DIGEST = ROOT / "tests" / "scripts" / "stdin_digest.py"


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

        def direct(i: int) -> float:
            return timed([sys.executable, str(DIGEST)], stdin=data, cwd=tmp, timeout=600, what="direct digest",
                         check=lambda r: want in r.stdout or f"digest {want} not printed: {r.stdout[-300:]!r}")

        def orch(i: int) -> float:
            rank0 = tmp / f"run{i}" / "logs" / "rank-0.log"
            return timed([sys.executable, "-m", "orchestrator", "run", "-n", "1", "--stdin", "rank0", "--quiet",
                          "--run-dir", str(tmp / f"run{i}"), str(DIGEST)], stdin=data, cwd=tmp, timeout=600,
                         what="orch run --stdin rank0",
                         check=lambda r: rank0.is_file() and want in rank0.read_text() or f"digest {want} not in {rank0}")

        times = alternate({"direct": direct, "orch": orch}, a.repeat)
        d, o = summary(times["direct"]).median, summary(times["orch"]).median
        print(f"{a.mib} MiB, median of {a.repeat}: direct {d:.2f}s, orch --stdin rank0 {o:.2f}s "
              f"({a.mib / o:.0f} MiB/s through orch), ratio {o / d:.2f}x")
        result_line("stdin_throughput", mib=a.mib, repeat=a.repeat, direct_s=times["direct"], orch_s=times["orch"],
                    median_direct_s=d, median_orch_s=o, mib_per_s=a.mib / o,
                    ratio=ratio(times["orch"], times["direct"]), cpus=os.cpu_count())


if __name__ == "__main__":
    main()
