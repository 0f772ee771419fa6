"""Every rank joins the group then sleeps (for interrupt and idle-CPU tests)."""
import os
import sys
import time

import mlx.core as mx

g = mx.distributed.init()
print(f"rank {g.rank()} pid {os.getpid()} sleeping", flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 60)
