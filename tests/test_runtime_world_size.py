"""The runtime knows the world size every backend's contract implies, so a failed init is an error, not N singletons.

Found on the way to the NCCL device run: with ``--backend nccl`` the runtime
read neither ``MLX_WORLD_SIZE`` nor the JACCL matrix, so ``init`` was not
strict; where NCCL cannot initialise (this CPU-only box), each rank fell back
to a singleton group and ``orch run recipes/mlp_regression.py -n 2 --backend
nccl`` "succeeded" as two independent trainings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.runtime import trainer

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE", "MLX_HOSTFILE", "MLX_IBV_DEVICES")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_nccl_world_size_comes_from_mlx_world_size(clean_env):
    clean_env.setenv("MLX_WORLD_SIZE", "2")
    assert trainer._expected_world_size() == 2


def test_jaccl_world_size_is_the_rdma_matrix_size(clean_env, tmp_path):
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([[None, "rdma_en3", "rdma_en4"], ["rdma_en3", None, "rdma_en5"],
                                   ["rdma_en4", "rdma_en5", None]]))
    clean_env.setenv("MLX_IBV_DEVICES", str(devices))
    assert trainer._expected_world_size() == 3


def test_no_launcher_means_no_expectation(clean_env):
    assert trainer._expected_world_size() is None


def test_nccl_that_cannot_initialise_fails_instead_of_training_alone(tmp_path):
    """A rank of a 2-rank NCCL job on a machine where NCCL cannot start: init_group raises."""
    import mlx.core as mx

    if mx.distributed.is_available("nccl"):
        pytest.skip("NCCL is available here: a lone rank 0 would wait for its peer")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env |= {"ORCH_BACKEND": "nccl", "MLX_RANK": "0", "MLX_WORLD_SIZE": "2", "NCCL_HOST_IP": "127.0.0.1",
            "NCCL_PORT": "1", "CUDA_VISIBLE_DEVICES": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    code = "from orchestrator.runtime.trainer import init_group; g = init_group(); print('SIZE', g.size())"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0, f"init_group returned a group: {p.stdout}"
    assert "SIZE" not in p.stdout
    assert "nccl" in p.stderr
