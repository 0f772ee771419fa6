"""Prints the CPUs this rank may run on (for --bind)."""
import os, mlx.core as mx
mx.distributed.init()
print("CPUS", sorted(os.sched_getaffinity(0)))
