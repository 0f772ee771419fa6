"""What a backend is to the controller: one object per backend, answering every question about it.

As ``mlx.launch`` keeps each backend in one function and DeepSpeed gives each runner
``backend_exists()`` and ``get_cmd()``, everything that differs between backends lives
on its ``Backend``: what it needs from the hostfile (``validate``), what each rank is
handed (``rank_env``, ``files``), how its ranks start (``started_by_mpirun``), whether
it has a ring to order and start (``ring``), a coordinator (``coordinator``) or an RDMA
matrix (``rdma``), what its failures mean
(``classify``, ``init_failures``) and what a person must hear after a kill
(``kill_warning``). Code outside ``orchestrator/backends/`` asks these; it never compares
a backend's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol, Sequence

if TYPE_CHECKING:
    from orchestrator.hostfile import Hostfile


class RankLike(Protocol):
    """What a backend reads of a rank's plan (``plan/model.py``'s ``RankPlan``; not imported: the plan asks
    the backends, so the backends must not import the plan)."""

    rank: int
    local_rank: int
    listen: list[str]


class PlanLike(Protocol):
    """What a backend reads of a job's plan (``plan/model.py``'s ``JobPlan``)."""

    world_size: int
    ranks: Sequence[RankLike]
    coordinator: Optional[str]
    rdma: Optional[list]


class Backend:
    name: str = ""
    started_by_mpirun = False  # mpirun starts the ranks and tells each who it is (one environment for all)
    ring = False  # MLX's TCP ring: listen addresses, the ring start (gate, hold), link checks, a ring order
    coordinator = False  # rank 0's address as a bootstrap every rank reaches (JACCL, NCCL)
    rdma = False  # an RDMA matrix (MLX_IBV_DEVICES), macOS RDMA checks, JACCL's failure modes
    stdin_to_all = True  # --stdin all (mpirun forwards stdin to one rank only)
    stages_files = True  # remote hosts can be handed files (mpirun stages nothing)

    def validate(self, hostfile: "Hostfile") -> None:
        """What the backend needs from the hostfile, as one-line ``ConfigError``s."""

    def rank_env(self, plan: "PlanLike", rank: "RankLike") -> dict[str, str]:
        """The variables ``mlx.launch`` hands this rank for this backend."""
        return {}

    def files(self, plan: "PlanLike") -> dict[str, str]:
        """``{env var: content}`` of the files every rank gets (``MLX_HOSTFILE``, ``MLX_IBV_DEVICES``)."""
        return {}

    def classify(self, lines: Iterable[str], rank: int = 0, plan: Any = None, signal: Optional[int] = None,
                 initialised: Optional[bool] = None) -> Any:
        """A failure this backend knows how to read from a rank's last lines, or None."""
        return None

    @property
    def init_failures(self) -> frozenset:
        """Diagnosis causes that mean the backend never came up (``--fallback-backend`` restarts on those)."""
        return frozenset()

    def kill_warning(self) -> Optional[str]:
        """What a person must know when a rank of this backend had to be SIGKILLed."""
        return None

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
