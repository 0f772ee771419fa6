"""Read this rank's stdin to end of file as bytes and print its length and SHA-256 (``orch run --stdin``)."""

import hashlib
import os
import sys

data = sys.stdin.buffer.read()
rank = os.environ.get("RANK") or os.environ.get("MLX_RANK") or "?"
print(f"rank {rank} read {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}", flush=True)
