"""Topology planning: which rank runs where, on which backend, and what each rank is handed.

A plan is everything about a job that follows from the hostfile and the
options, before anything starts: the backend (``backends.choose``: asked for,
named by the hostfile, or what its ``rdma`` matrix allows), which host each
rank runs on and its index there, the addresses and ports, and per rank the
environment and files that ``mlx.launch`` would hand it for that backend
(``rank_env`` / ``files``, per backend in ``orchestrator/backends/``), plus
torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` so
scripts written for either launcher run unchanged.

Which rank of a ring waits at a start gate (``gated``) and which is held once
it listens (``held``), and why that saves a second of launch time, is the
ring start's: ``plan/ringstart.py``; the plan only records them. The plan itself is data
(``plan/model.py``); this module makes it, once per attempt.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Optional

from orchestrator import backends
from orchestrator.backends.nccl import coordinator_ip
from orchestrator.backends.ring import listen_ips
from orchestrator.hostfile import ConfigError, Hostfile
from orchestrator.plan import ringstart
from orchestrator.plan.model import JobPlan, RankPlan, file_name, file_text

def write_files(plan: JobPlan, directory: str | os.PathLike) -> dict[str, str]:
    """Write ``plan.files()`` into ``directory`` (the run dir); ``{env var: path}`` for ``rank_env``.

    Remote ranks cannot read these: the SSH launcher stages the same content
    (``RankSpec.files``) into each host's run directory under the same names.
    """
    paths = {}
    for var, content in plan.files().items():
        path = Path(directory) / file_name(var)
        path.write_text(file_text(content))
        paths[var] = str(path)
    return paths


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


def _machine(hostfile: Hostfile, hi: int) -> str:
    """Ranks on one machine share a key: every local host is this machine; others by SSH name."""
    host = hostfile.hosts[hi]
    return "\0local" if host.is_local else host.name


def plan_job(
    hostfile: Hostfile,
    backend: Optional[str] = None,
    connections_per_ip: int = 1,
    starting_port: Optional[int] = None,
) -> JobPlan:
    """Hosts + slots -> ranks on a backend, with ports that do not collide with other runs.

    ``backend`` None: the hostfile's, else chosen from its rdma matrix (``backends.choose``).
    Every error is a one-line ``ConfigError`` raised before anything starts.
    """
    if connections_per_ip < 1:
        raise ConfigError(f"--connections-per-ip {connections_per_ip}: must be at least 1")
    choice = backends.choose(hostfile, backend)
    backend = choice.name
    kind = backends.get(backend)
    kind.validate(hostfile)
    rank_hosts = [i for i, h in enumerate(hostfile.hosts) for _ in range(h.slots)]
    n = len(rank_hosts)
    ring = kind.ring and n > 1
    gated, held = ringstart.roles(kind, n)
    ips = listen_ips(hostfile.hosts, rank_hosts) if ring else [[] for _ in rank_hosts]

    # Ports: local addresses are checked by binding; remote ones are checked by `orch check`.
    needed = sum(len(i) for i in ips) * connections_per_ip
    coordinator = None
    if kind.coordinator:
        coordinator = f"{coordinator_ip(hostfile, backend)}:{choose_ports(1, '127.0.0.1', starting_port)[0]}"
    ports = iter(choose_ports(needed, "127.0.0.1", starting_port) if needed else [])

    machines = [_machine(hostfile, hi) for hi in rank_hosts]
    ranks = []
    for r, hi in enumerate(rank_hosts):
        host = hostfile.hosts[hi]
        listen = [f"{ip}:{next(ports)}" for ip in ips[r] for _ in range(connections_per_ip)]
        ranks.append(
            RankPlan.model_construct(
                rank=r,
                host_index=hi,
                host=host.name,
                local=host.is_local,
                listen=listen,
                gated=r in gated,
                held=r in held,
                local_rank=machines[:r].count(machines[r]),
                local_size=machines.count(machines[r]),
            )
        )
    rdma = [list(h.rdma) for h in hostfile.hosts] if kind.rdma else None
    # Constructed, not validated: every value above is typed by the planner itself, and validating would build
    # the plan's validator (with pydantic's first-use set-up, ~15 ms) on every launch before its ranks get their
    # configuration. tests/test_plan.py checks that validation gives the same plan.
    return JobPlan.model_construct(backend=backend, backend_reason=choice.reason, world_size=n, ranks=ranks,
                                   coordinator=coordinator, rdma=rdma, ring_order=None)
