"""A rank that lies to orch's --stdin flow control: it prints a ``stdin_read`` event claiming it has read
everything (and closed its stdin), reads nothing until ``--wait-for FILE`` exists, then reads all and
prints the SHA-256 like stdin_digest.py. Only the guard's events (with its token) may count."""

import json
import os
import subprocess
import sys
import time

print("\x1eORCH " + json.dumps({"kind": "stdin_read", "rank": int(os.environ.get("RANK", "0")), "t": time.time(),
                                 "bytes": 1 << 40, "closed": True}), flush=True)
os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(__file__), "stdin_digest.py"), *sys.argv[1:]])
