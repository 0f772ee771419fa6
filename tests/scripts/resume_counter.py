"""A third-party-style program for ``--resume-arg``: numbered files, one crash, a resume option of its own.

Rank 0 writes ``$ORCH_RUN_DIR/out/step-NNNN.txt`` (content: the step) for each
step. At ``--crash-at K`` it exits 3 once (``$CRASH_MARKER`` records that it
did). ``--start-from FILE`` continues after the step written in FILE, as
mlx-lm's ``--resume-adapter-file`` continues from an adapter file. At the end
rank 0 prints which steps this attempt ran. Other ranks just exit 0.
"""

import argparse
import os
import sys
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--crash-at", type=int, default=-1)
ap.add_argument("--start-from")
args = ap.parse_args()

rank = int(os.environ.get("RANK", "0"))
if rank != 0:
    sys.exit(0)
out = Path(os.environ["ORCH_RUN_DIR"]) / "out"
out.mkdir(exist_ok=True)
first = 1
if args.start_from:
    first = int(Path(args.start_from).read_text()) + 1
    print(f"resuming from step {first - 1} ({args.start_from})", flush=True)
marker = Path(os.environ["CRASH_MARKER"])
ran = []
for step in range(first, args.steps + 1):
    (out / f"step-{step:04d}.txt").write_text(str(step))
    ran.append(step)
    if step == args.crash_at and not marker.exists():
        marker.write_text("crashed")
        print(f"crashing after step {step}", flush=True)
        sys.exit(3)
print("ran steps " + " ".join(map(str, ran)), flush=True)
