"""Two ranks step with all_sum and orch's progress API; rank HANG_RANK stops in wait_here() at step 3.

For the hang-diagnosis test: the others block in all_sum, the hung rank sits in
a Python function, and the diagnosis must quote where each one is.
"""

import os
import time

import mlx.core as mx

from orchestrator.runtime import report


def wait_here():
    while True:
        time.sleep(0.5)


def main():
    group = mx.distributed.init()
    hang_rank = int(os.environ.get("HANG_RANK", "1"))
    for step in range(1, 1000):
        if step == 3 and group.rank() == hang_rank:
            wait_here()
        x = mx.distributed.all_sum(mx.ones(4))
        mx.eval(x)
        report.step(step, loss=1.0 / step, samples=4, total_steps=1000)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
