"""Compute silently (pure Python, no output) for BUSY_CPU_S seconds of CPU time, then print and exit 0.

The negative case of the idle-hang watchdog: a rank that prints nothing for
longer than --hang-timeout but whose CPU time keeps advancing is working, not
hung, and must not be stopped. The loop is bounded by CPU time, not wall time,
so a loaded machine makes it slower, never shorter in CPU.
"""

import os
import time


def compute(cpu_s: float) -> int:
    n = 0
    end = time.process_time() + cpu_s
    while time.process_time() < end:
        for i in range(10000):
            n += i * i % 7
    return n


if __name__ == "__main__":
    n = compute(float(os.environ.get("BUSY_CPU_S", "6")))
    print(f"rank {os.environ.get('RANK')} done ({n % 1000})", flush=True)
