"""Prints what a rank sees: argv, cwd and selected environment variables."""
import json
import os
import sys

keys = ["MLX_RANK", "MLX_HOSTFILE", "FROM_CLI", "FROM_HOSTFILE", "FROM_HOST", "ORCH_RUN_DIR", "ORCH_HOST"]
print("REPORT " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}), flush=True)
