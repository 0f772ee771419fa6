"""Rank FAIL_RANK exits with FAIL_CODE after init while the others block in all_sum."""
import os
import sys
import time

import mlx.core as mx

g = mx.distributed.init()
fail_rank = int(os.environ.get("FAIL_RANK", "1"))
if os.environ.get("SPAWN_CHILD"):
    import subprocess

    child = subprocess.Popen(["sleep", "300"])
    print(f"rank {g.rank()} child {child.pid}", flush=True)
print(f"rank {g.rank()} pid {os.getpid()} ready", flush=True)
if g.rank() == fail_rank:
    time.sleep(float(os.environ.get("FAIL_AFTER", "0.5")))
    print("failing on purpose", file=sys.stderr, flush=True)
    if os.environ.get("FAIL_SIGNAL"):
        os.kill(os.getpid(), int(os.environ["FAIL_SIGNAL"]))
    sys.exit(int(os.environ.get("FAIL_CODE", "3")))
x = mx.distributed.all_sum(mx.ones(16))
mx.eval(x)
print("unexpectedly finished", flush=True)
