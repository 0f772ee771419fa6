"""Check orch's sum_scatter stand-in against all_sum-then-slice on every rank (tests/test_collectives.py).

Prints one ``sum_scatter_check {json}`` line per rank: for each case whether the result matched
bit for bit (integer-valued data, whose sums are exact in any order) and the largest difference on
random data (where the summation order may differ from all_sum's by a rounding).
"""

import json
import sys

import mlx.core as mx

group = mx.distributed.init()
n, rank = group.size(), group.rank()
installed = mx.distributed.sum_scatter.__module__ == "orchestrator.runtime.collectives"

SHAPES = [(n,), (4 * n,), (n * 1000,), (2 * n, 3), (n, 5, 7), (3 * n, 64, 33), (n * 8, 1 << 15)]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, "int32": mx.int32}
results = []
for shape in SHAPES:
    for name, dtype in DTYPES.items():
        mx.random.seed(1234 + rank)
        ints = mx.random.randint(-8, 9, shape).astype(dtype)
        rand = mx.random.normal(shape).astype(dtype) if name != "int32" else ints
        row = {"shape": list(shape), "dtype": name}
        for label, x in (("exact", ints), ("random", rand)):
            got = mx.distributed.sum_scatter(x, group=group)
            part = shape[0] // n
            want = mx.distributed.all_sum(x, group=group)[rank * part:(rank + 1) * part]
            mx.eval(got, want)
            assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
            diff = mx.abs(got.astype(mx.float32) - want.astype(mx.float32))
            scale = mx.maximum(mx.abs(want.astype(mx.float32)), 1.0)
            row[label] = bool(mx.array_equal(got, want).item()) if label == "exact" else float(mx.max(diff / scale).item())
        results.append(row)
try:
    mx.distributed.sum_scatter(mx.zeros((n + 1, 2)), group=group)
    refused = None
except ValueError as e:
    refused = str(e)
print("sum_scatter_check " + json.dumps({"rank": rank, "size": n, "installed": installed, "results": results,
                                         "refused": refused}), flush=True)
