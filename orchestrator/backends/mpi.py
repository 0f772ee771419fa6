"""MLX's MPI backend: Open MPI's ``mpirun`` starts the ranks and tells each its rank.

Nothing per rank comes from orch (``mlx.launch`` passes only ``--env`` values
with ``-x``), so ``MLX_RANK``, ``RANK`` and ``LOCAL_RANK`` are not set here:
one environment goes to every rank through ``mpirun -x``. The rank's bootstrap
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` from Open
MPI's ``OMPI_COMM_WORLD_*`` variables before the program starts, whatever its form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.hostfile import Hostfile

if TYPE_CHECKING:
    from orchestrator.plan import JobPlan, RankPlan

PER_RANK = False  # one environment for every rank (mpirun -x)


def validate(hostfile: Hostfile, backend: str = "mpi") -> None:
    """Open MPI itself is looked for by ``launch/mpi.find_mpi``; the hostfile needs nothing more."""


def rank_env(plan: "JobPlan", rank: "RankPlan") -> dict[str, str]:
    return {}


def files(plan: "JobPlan") -> dict[str, str]:
    return {}
