"""Echo what this rank reads on stdin (``orch run --stdin``): one line per input line, then one at end of file.

``rank 0 got 'hello'`` ... ``rank 0 eof after 2 lines``. ``--then-sleep S``:
stay S seconds after end of file (a rank whose input ended is not stopped).
``--crash-once MARKER``: after end of file, exit 3 unless MARKER exists (and create it).
"""

import os
import sys
import time

rank = os.environ.get("RANK") or os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
n = 0
for line in sys.stdin:
    n += 1
    print(f"rank {rank} got {line.rstrip(chr(10))!r}", flush=True)
print(f"rank {rank} eof after {n} lines", flush=True)
if len(sys.argv) > 2 and sys.argv[1] == "--then-sleep":
    time.sleep(float(sys.argv[2]))
if len(sys.argv) > 2 and sys.argv[1] == "--crash-once" and not os.path.exists(sys.argv[2]):
    open(sys.argv[2], "w").close()
    print(f"rank {rank} crashing once", flush=True)
    sys.exit(3)
