"""Read this rank's stdin to end of file as bytes and print its length and SHA-256 (``orch run --stdin``).

``--wait-for FILE``: first wait (up to 120 s) until FILE exists, reading
nothing meanwhile: a rank that does not read, for the flow-control test.
"""

import hashlib
import os
import sys
import time

if len(sys.argv) > 2 and sys.argv[1] == "--wait-for":
    deadline = time.monotonic() + 120
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.05)
data = sys.stdin.buffer.read()
rank = os.environ.get("RANK") or os.environ.get("MLX_RANK") or "?"
print(f"rank {rank} read {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}", flush=True)
