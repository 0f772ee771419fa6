"""Rank program for tests/test_runtime_quiet_wait.py: builds a QuietBarrier and reports what it saw.

argv[1] is the case:
  wait    -- the last rank sleeps, writes the time it arrives, then waits; every rank reports when its
             wait returned and the CPU time it spent waiting.
  groups  -- the last rank waits only after rank 0's barrier has returned (a file rank 0 writes): works
             only if the barrier is per machine (QW_HOSTS puts them on different "machines").
  broken  -- rank 1 cannot connect (create_connection raises): every rank must turn the wait off.
  nobind  -- rank 0 (a leader) cannot listen (bind raises): the same, and no rank hangs in the rendezvous.
QW_HOSTS: comma-separated machine name per rank (the hostfile names orch gives as ORCH_HOST).
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

import mlx.core as mx

from orchestrator.runtime.quiet_wait import QuietBarrier

case = sys.argv[1]
group = mx.distributed.init()
rank, world = group.rank(), group.size()
here = Path.cwd()
if case == "broken" and rank == 1:
    def refuse(*_a, **_k):
        raise ConnectionRefusedError("test: refused")
    socket.create_connection = refuse
if case == "nobind" and rank == 0:
    def no_bind(self, *_a):
        raise PermissionError("test: no bind")
    socket.socket.bind = no_bind
hosts = os.environ["QW_HOSTS"].split(",")
barrier = QuietBarrier(group, host=hosts[rank])
out = {"rank": rank, "leader": barrier.leader, "active": barrier.active, "failed": barrier.failed}
if case == "wait":
    if rank == world - 1:
        time.sleep(1.5)
        out["arrived"] = time.time()
    cpu0, wall0 = time.process_time(), time.time()
    barrier.wait()
    out.update(returned=time.time(), wait_cpu_s=time.process_time() - cpu0, wait_wall_s=time.time() - wall0)
elif case == "groups":
    if rank == world - 1:
        deadline = time.monotonic() + 30
        while not (here / "rank0-passed").exists():
            if time.monotonic() > deadline:
                sys.exit("rank 0 never passed its barrier: the barrier spans machines")
            time.sleep(0.02)
    barrier.wait()
    if rank == 0:
        (here / "rank0-passed").write_text("ok")
else:
    barrier.wait()  # a no-op when inactive
mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # nobody leaves before the others are done
barrier.close()
print("QW " + json.dumps(out), flush=True)
