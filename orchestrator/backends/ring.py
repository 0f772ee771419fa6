"""MLX's ring backend: TCP between neighbours, described by ``MLX_HOSTFILE``.

``mlx/distributed/ring/ring.cpp`` reads ``MLX_RANK`` and ``MLX_HOSTFILE``, a
JSON list with, per rank, the ``"ip:port"`` strings that rank listens on; rank
i connects to rank i+1's entries. So the address listed for rank i must be
reachable *from rank i-1*.

The Thunderbolt rule: on a ring of point-to-point cables every Mac has one
address per cable. Rank i must list its address on the cable to its *left*
neighbour (rank i-1), because that is the only one of its addresses rank i-1
can reach directly. When a host's ``ips`` carry prefix lengths
("10.0.1.2/30") we pick, for each rank, the address that shares a subnet with
an address of the previous rank's host. Without prefixes, ``ips`` keep MLX's
meaning: all of them are used, each as one more connection.
"""

from __future__ import annotations

import ipaddress
import json
from typing import TYPE_CHECKING, Optional

from orchestrator.backends.base import Backend
from orchestrator.hostfile import ConfigError, Host

if TYPE_CHECKING:
    from orchestrator.backends.base import PlanLike


def _subnet(ip: str) -> Optional[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    iface = ipaddress.ip_interface(ip)
    if iface.network.prefixlen == iface.max_prefixlen:
        return None
    return iface.network


def link_mode(host: Host) -> bool:
    """A host on point-to-point links lists its addresses with prefix lengths."""
    return any("/" in ip for ip in host.ips)


def listen_ips(hosts: list[Host], rank_hosts: list[int]) -> list[list[str]]:
    """The bare IPs each rank listens on (before ports), per the rules above."""
    n = len(rank_hosts)
    out: list[list[str]] = []
    for r, hi in enumerate(rank_hosts):
        host = hosts[hi]
        if not host.ips:
            if host.is_local:
                out.append(["127.0.0.1"])
                continue
            raise ConfigError(
                f"hosts[{hi}] ({host.name}): the ring backend needs the address this rank listens on; "
                "add \"ips\": [\"<address reachable from the previous host>\"]"
            )
        if not link_mode(host):
            out.append(host.bare_ips)
            continue
        left = hosts[rank_hosts[(r - 1) % n]]
        if left is host:
            out.append([host.bare_ips[0]])
            continue
        left_nets = {_subnet(ip) for ip in left.ips} - {None}
        shared = [str(ipaddress.ip_interface(ip).ip) for ip in host.ips if _subnet(ip) in left_nets]
        if not shared:
            raise ConfigError(
                f"hosts[{hi}] ({host.name}): none of its addresses {host.ips} is on a link to its left neighbour "
                f"{left.name} ({left.ips}); cable them or reorder the hosts so neighbours share a /30"
            )
        out.append(shared[:1])
    return out


class Ring(Backend):
    """The ring's needs (an address per rank, the left-neighbour rule) are checked while planning addresses."""

    name = "ring"
    ring = True

    def files(self, plan: "PlanLike") -> dict[str, str]:
        """``MLX_HOSTFILE``; a single rank gets none (MLX then runs as a singleton group)."""
        if plan.world_size < 2:
            return {}
        return {"MLX_HOSTFILE": json.dumps([r.listen for r in plan.ranks])}


BACKENDS = {"ring": Ring()}
