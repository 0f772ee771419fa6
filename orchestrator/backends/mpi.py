"""MLX's MPI backend: Open MPI's ``mpirun`` starts the ranks and tells each its rank.

Nothing per rank comes from orch (``mlx.launch`` passes only ``--env`` values
with ``-x``), so ``MLX_RANK``, ``RANK`` and ``LOCAL_RANK`` are not set here:
one environment goes to every rank through ``mpirun -x``. The rank's bootstrap
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` from Open
MPI's ``OMPI_COMM_WORLD_*`` variables before the program starts, whatever its form.
"""

from __future__ import annotations

from orchestrator.backends.base import Backend


class Mpi(Backend):
    """Open MPI itself is looked for by ``launch/mpi.find_mpi``; the hostfile needs nothing more."""

    name = "mpi"
    started_by_mpirun = True
    stdin_to_all = False  # mpirun forwards stdin to one rank; Open MPI 5's --stdin all fails
    stages_files = False  # mpirun stages nothing: the code must be at the same path on every host


BACKENDS = {"mpi": Mpi()}
