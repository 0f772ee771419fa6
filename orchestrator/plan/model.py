"""A job's plan as data: which rank runs where, on which backend, listening where.

``plan/planner.py`` makes it (once per attempt); the launchers, the supervisor and
``plan.json`` read it. Each rank's environment is ``plan/environment.py``'s; what the
backend adds to it, ``rank_env`` and ``files`` here ask the backend object for.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from orchestrator.schema import Model

# Where the controller writes each per-job file mlx.launch hands the ranks (env var -> file name in the run dir).
FILE_NAMES = {"MLX_HOSTFILE": "mlx-hostfile.json", "MLX_IBV_DEVICES": "mlx-ibv-devices.json"}


class RankPlan(Model):
    rank: int
    host_index: int
    host: str
    local: bool
    listen: list[str]
    gated: bool = False
    held: bool = False
    local_rank: int = 0  # index among the ranks on the same machine (torchrun's LOCAL_RANK; the GPU for nccl)
    local_size: int = 1  # ranks on that machine (LOCAL_WORLD_SIZE)


class JobPlan(Model):
    backend: str
    world_size: int
    ranks: list[RankPlan]
    backend_reason: str = ""  # why this backend: printed by the CLI, kept in plan.json
    coordinator: Optional[str] = None  # jaccl: MLX_JACCL_COORDINATOR; nccl: NCCL_HOST_IP:NCCL_PORT
    rdma: Optional[list[list[Any]]] = None  # jaccl: the matrix behind MLX_IBV_DEVICES
    ring_order: Optional[dict[str, Any]] = None  # --ring-order measured: ringorder.RingChoice (order, bottleneck, links)

    @property
    def mlx_hostfile(self) -> list[list[str]]:
        return [r.listen for r in self.ranks]

    def mlx_hostfile_json(self) -> str:
        return json.dumps(self.mlx_hostfile)

    def files(self) -> dict[str, str]:
        """``{env var: content}`` of the files every rank gets (mlx.launch's ``files``), e.g. MLX_IBV_DEVICES."""
        from orchestrator import backends

        return backends.get(self.backend).files(self)

    def rank_env(self, rank: RankPlan, paths: dict[str, str]) -> dict[str, str]:
        """What this rank is handed for its backend, exactly as mlx.launch would, plus torchrun's names.

        ``paths``: ``{env var: path}`` where the ``files()`` lie for this rank
        (``write_files`` for the controller's machine; a remote launcher
        rewrites them for its host).
        """
        from orchestrator import backends

        kind = backends.get(self.backend)
        env: dict[str, str] = {}
        if not kind.started_by_mpirun:  # under mpirun, Open MPI tells each rank who it is
            env.update(MLX_RANK=str(rank.rank), RANK=str(rank.rank), LOCAL_RANK=str(rank.local_rank))
        env.update(WORLD_SIZE=str(self.world_size), LOCAL_WORLD_SIZE=str(rank.local_size))
        env.update(kind.rank_env(self, rank))
        for var in self.files():
            env[var] = paths[var]
        return env


def file_name(var: str) -> str:
    """The name of the file behind ``var`` in a run directory, local or remote (the same on every host)."""
    return FILE_NAMES.get(var, var.lower() + ".json")


def file_text(content: str) -> str:
    """What mlx.launch's ``echo CONTENT > $fname`` leaves: the text and a newline."""
    return content + "\n"
