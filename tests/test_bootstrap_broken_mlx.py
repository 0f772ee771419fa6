"""A rank whose MLX fails to import is reported with MLX's own error, not a nanobind abort.

Seen on the lent GPU machine: ``orch run -n 2 --backend nccl`` on one GPU hands
rank 1 ``CUDA_VISIBLE_DEVICES=1``; MLX's CUDA build then fails its import
("cudaMallocManaged ... no CUDA-capable device is detected"). The bootstrap
swallowed that ImportError, the script imported ``mlx.core`` again, and nanobind
aborted the rank ("refusing to add duplicate key") with the cause nowhere in
the log. The stand-in ``mlx`` below behaves the same way: its first import
raises, a second one aborts the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BROKEN_CORE = '''
import os, sys
if getattr(sys, "_stand_in_mlx_imported", False):
    sys.stderr.write('Critical nanobind error: refusing to add duplicate key "cpu" to enumeration\\n')
    sys.stderr.flush()
    os.abort()
sys._stand_in_mlx_imported = True
raise ImportError("cudaMallocManaged(&data, size) failed: no CUDA-capable device is detected")
'''


def test_failed_mlx_import_is_reported_with_its_cause(tmp_path):
    fake = tmp_path / "site" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text(BROKEN_CORE)
    script = tmp_path / "train.py"
    script.write_text("import mlx.core as mx\nprint('UNREACHABLE')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(ROOT)])
    # --backend nccl: ranks start the ordinary way (no pre-start), as on the GPU machine
    p = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(script), "-n", "1", "--backend", "nccl",
                        "--run-dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    log = (tmp_path / "run" / "logs" / "rank-0.log").read_text()
    assert p.returncode != 0
    assert "no CUDA-capable device is detected" in log
    assert "duplicate key" not in log and "UNREACHABLE" not in log
    assert "no CUDA-capable device is detected" in p.stdout + p.stderr  # the failure summary quotes the cause
