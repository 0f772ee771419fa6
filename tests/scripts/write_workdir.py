"""Write files in the working directory, as mlx-lm writes ``adapters/`` (collection of a remote rank 0's cwd).

Every rank writes ``adapters/000000N_adapters.safetensors`` (N = its rank + 1,
content names the rank) and ``notes.txt``, relative to its working directory.
"""

import os
from pathlib import Path

rank = int(os.environ.get("RANK", "0"))
Path("adapters").mkdir(exist_ok=True)
Path("adapters", f"{rank + 1:07d}_adapters.safetensors").write_bytes(f"weights of rank {rank}\n".encode() * 100)
Path("notes.txt").write_text(f"rank {rank} was here\n")
print(f"rank {rank} wrote in {os.getcwd()}", flush=True)
