"""MLX's NCCL backend (CUDA): rank 0's address as the NCCL bootstrap, one GPU per rank.

``mlx.launch`` (``launch_nccl``) hands every rank ``MLX_RANK``,
``MLX_WORLD_SIZE``, ``NCCL_HOST_IP`` (rank 0's first IP), ``NCCL_PORT`` and
``CUDA_VISIBLE_DEVICES``. It sets the last to ``rank % --repeat-hosts``, which is
the rank's index on its host for ``-n K`` and 0 for every rank of a hostfile
(so two hostfile entries for one machine would share GPU 0). orch gives the
rank's index among the ranks on the same machine, which equals mlx.launch's for
``-n K`` and is right for hostfiles too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.backends.base import Backend
from orchestrator.hostfile import ConfigError, Hostfile

if TYPE_CHECKING:
    from orchestrator.backends.base import PlanLike, RankLike


def coordinator_ip(hostfile: Hostfile, backend: str) -> str:
    """Rank 0's first address, which every other rank must reach (``mlx.launch``: "Rank 0 should have an IP ...")."""
    host = hostfile.hosts[0]
    if host.ips:
        return host.bare_ips[0]
    if all(h.is_local for h in hostfile.hosts):
        return "127.0.0.1"
    raise ConfigError(
        f"{hostfile.path or '<hostfile>'}: hosts[0] ({host.name}): the {backend} backend needs rank 0's address, "
        "which every other rank connects to; add \"ips\": [\"<address of this host reachable from all others>\"]"
    )


class Nccl(Backend):
    name = "nccl"
    coordinator = True

    def validate(self, hostfile: Hostfile) -> None:
        coordinator_ip(hostfile, self.name)

    def rank_env(self, plan: "PlanLike", rank: "RankLike") -> dict[str, str]:
        host, _, port = (plan.coordinator or "").rpartition(":")
        return {
            "MLX_WORLD_SIZE": str(plan.world_size),
            "NCCL_HOST_IP": host,
            "NCCL_PORT": port,
            "CUDA_VISIBLE_DEVICES": str(rank.local_rank),
        }


BACKENDS = {"nccl": Nccl()}
