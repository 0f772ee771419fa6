"""Stop in pdb on rank 0 (``breakpoint()``); a test drives the debugger through ``orch run --stdin rank0``."""

import os

answer = 6 * 7
if os.environ.get("RANK", "0") == "0":
    breakpoint()
print(f"rank {os.environ.get('RANK')} finished, answer={answer}", flush=True)
