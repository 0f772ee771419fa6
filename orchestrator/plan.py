"""Topology planning: which rank runs where and listens on which address.

MLX's ring backend (``mlx/distributed/ring/ring.cpp``) reads ``MLX_RANK`` and
``MLX_HOSTFILE``, a JSON list with, per rank, the ``"ip:port"`` strings that
rank listens on; rank i connects to rank i+1's entries. So the address listed
for rank i must be reachable *from rank i-1*.

The Thunderbolt rule: on a ring of point-to-point cables every Mac has one
address per cable. Rank i must list its address on the cable to its *left*
neighbour (rank i-1), because that is the only one of its addresses rank i-1
can reach directly. When a host's ``ips`` carry prefix lengths
("10.0.1.2/30") we pick, for each rank, the address that shares a subnet with
an address of the previous rank's host. Without prefixes, ``ips`` keep MLX's
meaning: all of them are used, each as one more connection.

Connection order matters for launch speed: ranks 0..N-2 bind and accept
first, rank N-1 *connects first* (to rank 0). If rank N-1 connects before
rank 0 listens, MLX sleeps a whole second before retrying. The plan therefore
marks rank N-1 as ``gated``: it waits for a "go" that the supervisor sends
once every other rank reports its socket is listening.

That leaves a second race: the moment rank N-1's connect succeeds, rank 0
accepts and the ring forms hop by hop (0 connects to 1, 1 to 2, ...) until
rank N-2 connects to rank N-1 — which only now binds its own socket. With two
ranks (or a fast chain) the connect wins ~25% of the time on a busy machine
and costs another second. So rank 0 is also ``held``: its guard SIGSTOPs it
as soon as it listens (it is blocked in accept(); the kernel still completes
rank N-1's handshake into the listen backlog), and the supervisor releases it
once rank N-1 listens too. Then every connect in the chain finds a listener.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
from typing import Optional

from pydantic import BaseModel

from orchestrator.hostfile import ConfigError, Host, Hostfile


class RankPlan(BaseModel):
    rank: int
    host_index: int
    host: str
    local: bool
    listen: list[str]
    gated: bool = False
    held: bool = False


class JobPlan(BaseModel):
    backend: str
    world_size: int
    ranks: list[RankPlan]

    @property
    def mlx_hostfile(self) -> list[list[str]]:
        return [r.listen for r in self.ranks]

    def mlx_hostfile_json(self) -> str:
        return json.dumps(self.mlx_hostfile)


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


def _port_is_free(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def choose_ports(count: int, ip: str = "127.0.0.1", start: Optional[int] = None, rng: Optional[random.Random] = None) -> list[int]:
    """``count`` distinct ports that are free right now on ``ip``.

    A random base in 20000-59999 keeps two concurrent runs on one machine from
    picking the same ports; each port is checked by binding it.
    """
    rng = rng or random.Random()
    ports: list[int] = []
    port = start if start is not None else rng.randrange(20000, 60000 - 4 * count)
    attempts = 0
    while len(ports) < count:
        attempts += 1
        if attempts > 10 * count + 1000:
            raise ConfigError(f"could not find {count} free TCP ports on {ip} starting at {start}")
        if port >= 65535:
            port = 20000
        if _port_is_free(ip, port):
            ports.append(port)
        port += 1
    return ports


def plan_job(
    hostfile: Hostfile,
    backend: str = "ring",
    connections_per_ip: int = 1,
    starting_port: Optional[int] = None,
) -> JobPlan:
    """Hosts + slots -> ranks, with ports that do not collide with other runs."""
    if connections_per_ip < 1:
        raise ConfigError(f"--connections-per-ip {connections_per_ip}: must be at least 1")
    rank_hosts = [i for i, h in enumerate(hostfile.hosts) for _ in range(h.slots)]
    n = len(rank_hosts)
    ips = listen_ips(hostfile.hosts, rank_hosts) if backend == "ring" and n > 1 else [[] for _ in rank_hosts]

    # Ports: local addresses are checked by binding; remote ones are checked by `orch check`.
    needed = sum(len(i) for i in ips) * connections_per_ip
    ports = iter(choose_ports(needed, "127.0.0.1", starting_port) if needed else [])

    ranks = []
    for r, hi in enumerate(rank_hosts):
        host = hostfile.hosts[hi]
        listen = [f"{ip}:{next(ports)}" for ip in ips[r] for _ in range(connections_per_ip)]
        ranks.append(
            RankPlan(
                rank=r,
                host_index=hi,
                host=host.name,
                local=host.is_local,
                listen=listen,
                gated=backend == "ring" and n > 1 and r == n - 1,
                held=backend == "ring" and n > 1 and r == 0,
            )
        )
    return JobPlan(backend=backend, world_size=n, ranks=ranks)
