"""Prints what a JACCL rank is handed, as JACCL itself would read it: the file MLX_IBV_DEVICES names, parsed.

One line: ``JACCL {"rank", "host", "path", "realpath", "matrix", "coordinator", "ring"}``; exits 3 if
the file is not there (JACCL would fail to start).
"""
import json
import os
import socket
import sys

path = os.environ.get("MLX_IBV_DEVICES")
try:
    with open(path) as f:
        matrix = json.load(f)
except (OSError, TypeError, ValueError) as e:
    print(f"MLX_IBV_DEVICES={path!r}: {e}", file=sys.stderr)
    sys.exit(3)
print("JACCL " + json.dumps({
    "rank": int(os.environ["MLX_RANK"]), "host": socket.gethostname(), "path": path, "realpath": os.path.realpath(path),
    "matrix": matrix, "coordinator": os.environ.get("MLX_JACCL_COORDINATOR"), "ring": os.environ.get("MLX_JACCL_RING"),
}), flush=True)
