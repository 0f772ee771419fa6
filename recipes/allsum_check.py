"""The smallest smoke test: a plain mlx.launch-style script (no orchestrator import).

Every rank contributes (rank + 1) and checks that all_sum gives n(n+1)/2.
Runs unchanged under `mlx.launch`, `orch run`, or plain `python`.
"""

import sys

import mlx.core as mx

group = mx.distributed.init()
rank, size = group.rank(), group.size()
x = mx.distributed.all_sum(mx.full((8,), rank + 1.0), group=group)
mx.eval(x)
expected = size * (size + 1) / 2
ok = bool(mx.all(x == expected).item())
print(f"rank {rank}/{size}: all_sum = {x[0].item():g} (expected {expected:g}) {'OK' if ok else 'WRONG'}")
sys.exit(0 if ok else 1)
