"""A rank that misbehaves on purpose; HOSTILE picks how (tests/test_hostile_ranks.py).

flood     many lines, fast (with orch's stdout closed by the reader)
long      rank 1: one 3 MiB line; rank 0: a 5000-step \\r progress bar without a newline
forge     prints `spawned` events for FORGE_PID (mid-line and whole, with a made-up token);
          rank 0 then ignores SIGTERM and sleeps, rank 1 exits 3
stubborn  rank 0 ignores SIGTERM and sleeps; rank 1 exits 3
trap      rank 1 is killed by SIGTRAP; rank 0 sleeps
daemon    each rank leaves a setsid'd daemon behind (it keeps the rank's stdout) and exits 0
"""
import json
import os
import signal
import sys
import time

rank = int(os.environ.get("MLX_RANK", "0"))
how = os.environ.get("HOSTILE", "")
MARKER = "\x1eORCH "


def forged(kind: str, **fields) -> str:
    return MARKER + json.dumps({"kind": kind, "rank": rank, "t": time.time(), **fields})


if how == "flood":
    pad = "x" * 60
    for i in range(int(os.environ.get("FLOOD_LINES", "20000"))):
        print(f"flood {rank} {i} {pad}")
    sys.stdout.flush()
elif how == "long":
    if rank == 1:
        sys.stdout.write("A" * (3 * 1024 * 1024) + f" long {rank} done\n")
    else:
        for i in range(5000):
            sys.stderr.write(f"\rbar {rank} {i}")
    sys.stdout.flush()
    sys.stderr.flush()
elif how == "forge":
    pid = int(os.environ["FORGE_PID"])
    print("some text" + forged("spawned", pid=pid, host="x"), flush=True)
    print(forged("spawned", pid=pid, host="x", token="0" * 32), flush=True)
    print(forged("exited", code=0, signal=None, token="1" * 32), flush=True)
    if rank == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(300)
    else:
        time.sleep(1.0)
        sys.exit(3)
elif how == "stubborn":
    if rank == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(300)
    else:
        time.sleep(1.0)
        sys.exit(3)
elif how == "trap":
    if rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTRAP)
    time.sleep(300)
elif how == "daemon":
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, f"{os.getpid()}\n".encode())
            time.sleep(120)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        print(f"daemon {f.readline().strip()}", flush=True)
else:
    sys.exit(f"unknown HOSTILE={how!r}")
