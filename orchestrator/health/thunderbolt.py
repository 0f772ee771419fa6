"""Thunderbolt topology of a set of Macs: cables, a ring through them, its addresses.

Why: MLX's ring backend over Thunderbolt needs (1) a cable ring through all hosts, (2) a
small subnet per cable, set on the right ``enX`` at both ends, and (3) a hostfile in
which rank i lists its own address on the cable to rank i-1 (in
``mlx/distributed/ring/ring.cpp`` rank i accepts on its own hostfile entry and
connects to the entry of rank i+1). ``mlx.distributed_config`` does this interactively
over SSH and says only "Could not find a full ring". Here it is pure functions of the
command outputs, so ``orch check`` can say *which* cable is missing, and it can be
tested on Linux against recorded macOS output (``tests/fixtures/macos/``).

The split: ``thunderbolt_host.py`` reads one Mac's recorded outputs into a
``TBHost``; this module joins several hosts into a cable graph, finds the ring,
assigns addresses, writes the commands and the hostfile, and plans RDMA
(JACCL) over the same cables.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Mapping
from typing import Any, Optional, Union

from pydantic import Field

from orchestrator.health.thunderbolt_host import TBHost, TBModel, TBPort, parse_host

NETMASK_30 = "255.255.255.252"
DEFAULT_BASE = "192.168.0.0"  # mlx.distributed_config's first /30 is 192.168.0.1/.2


class TopologyError(ValueError):
    """The outputs cannot describe a usable Thunderbolt setup (message says why)."""


class NoRingError(TopologyError):
    """No cable ring through all hosts; ``.search`` holds the diagnosis."""

    def __init__(self, search: "RingSearch"):
        super().__init__(search.message)
        self.search = search


# --------------------------------------------------------------------------------------
# Several hosts: the cable graph


class CableEnd(TBModel):
    host: str
    bus: str
    receptacle: Optional[str] = None
    iface: Optional[str] = None
    domain_uuid: str


class Cable(TBModel):
    a: CableEnd
    b: CableEnd
    speed: Optional[str] = None
    both_ends: bool  # False: only one side lists the other (flaky link or stale output)

    def hosts(self) -> tuple[str, str]:
        return (self.a.host, self.b.host)

    def other_host(self, host: str) -> str:
        return self.b.host if self.a.host == host else self.a.host

    def oriented(self, host: str) -> tuple[CableEnd, CableEnd]:
        """(the end on ``host``, the far end)."""
        return (self.a, self.b) if self.a.host == host else (self.b, self.a)


class StrayCable(TBModel):
    """A port cabled to a Mac that is not one of the hosts."""

    host: str
    port: TBPort


class CableGraph(TBModel):
    hosts: list[str]  # input order; the first host becomes rank 0
    cables: list[Cable]
    strays: list[StrayCable] = Field(default_factory=list)
    parsed: dict[str, TBHost] = Field(default_factory=dict)

    def between(self, x: str, y: str) -> list[Cable]:
        return [c for c in self.cables if set(c.hosts()) == {x, y}]

    def cables_of(self, host: str) -> list[Cable]:
        return [c for c in self.cables if host in c.hosts()]


HostInput = Union[TBHost, tuple[Any, Optional[str]]]


def build_cable_graph(hosts: Mapping[str, HostInput]) -> CableGraph:
    """{hostname: TBHost or (system_profiler output, networksetup output or None)} ->
    the cables between those hosts, each once, with both ends' port and ``enX``."""
    parsed = {h: v if isinstance(v, TBHost) else parse_host(*v) for h, v in hosts.items()}
    owner: dict[str, tuple[str, TBPort]] = {}
    for h, host in parsed.items():
        for p in host.ports:
            if p.domain_uuid in owner:
                raise TopologyError(
                    f"Thunderbolt domain {p.domain_uuid} is on both {owner[p.domain_uuid][0]} "
                    f"and {h}: was the same system_profiler output given for two hosts?"
                )
            owner[p.domain_uuid] = (h, p)
    cables: list[Cable] = []
    strays: list[StrayCable] = []
    seen: set[frozenset[str]] = set()
    for h, host in parsed.items():
        for p in host.ports:
            if p.peer is None:
                continue
            if p.peer.domain_uuid not in owner:
                strays.append(StrayCable(host=h, port=p))
                continue
            oh, op = owner[p.peer.domain_uuid]
            key = frozenset((p.domain_uuid, op.domain_uuid))
            if oh == h or key in seen:
                continue
            seen.add(key)
            ends = [
                CableEnd(host=x, bus=q.bus, receptacle=q.receptacle, iface=q.iface,
                         domain_uuid=q.domain_uuid)
                for x, q in ((h, p), (oh, op))
            ]
            both = op.peer is not None and op.peer.domain_uuid == p.domain_uuid
            cables.append(Cable(a=ends[0], b=ends[1], speed=p.speed, both_ends=both))
    return CableGraph(hosts=list(parsed), cables=cables, strays=strays, parsed=parsed)


# --------------------------------------------------------------------------------------
# The ring


class RingSearch(TBModel):
    """Result of :func:`find_ring`: a ring (rank order) or why there is none."""

    ring: Optional[list[str]] = None
    cables_per_hop: int = 0  # min cables between ring neighbours: MLX uses that many
    missing: list[tuple[str, str]] = Field(default_factory=list)  # cheapest fix
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.ring is not None


def _hops(order: tuple[str, ...]) -> list[tuple[str, str]]:
    n = len(order)
    return [(order[i], order[(i + 1) % n]) for i in range(n if n > 2 else 1)]


def find_ring(graph: CableGraph) -> RingSearch:
    """A cycle through all hosts along cables (brute force: N is a handful of Macs).

    The first host stays rank 0. Among rings, the one with the most cables on its
    thinnest hop wins (MLX's ring uses that many connections per neighbour). For two
    hosts one cable is a ring. Without a ring, the diagnosis names the hosts with too
    few cables and the fewest cables that would close a ring.
    """
    names = graph.hosts
    if len(names) < 2:
        raise TopologyError("a Thunderbolt ring needs at least 2 hosts")
    if len(names) > 10:
        raise TopologyError("ring search is brute force; more than 10 hosts is not supported")
    mult = {frozenset(pair): len(graph.between(*pair))
            for pair in itertools.combinations(names, 2)}
    best, best_count, fix = None, 0, None
    for rest in itertools.permutations(names[1:]):
        order = (names[0], *rest)
        counts = [mult[frozenset(hop)] for hop in _hops(order)]
        if min(counts) > best_count:
            best, best_count = list(order), min(counts)
        missing = [hop for hop, c in zip(_hops(order), counts) if c == 0]
        if fix is None or len(missing) < len(fix):
            fix = missing
    if best is not None:
        return RingSearch(ring=best, cables_per_hop=best_count,
                          message=f"ring: {' -> '.join(best)} -> {best[0]}")
    need = 1 if len(names) == 2 else 2
    parts = []
    for h in names:
        own = graph.cables_of(h)
        neighbours = sorted({c.other_host(h) for c in own})
        if len(own) < need:
            parts.append(f"{h} has {len(own)} Thunderbolt cable{'s' if len(own) != 1 else ''} "
                         f"to the other hosts (needs {need})")
        elif len(neighbours) < need:
            parts.append(f"all {len(own)} of {h}'s cables go to {neighbours[0]} "
                         f"(needs {need} different neighbours)")
    parts += [f"missing a cable between {x} and {y}" for x, y in fix or []]
    for s in graph.strays:
        p = s.port
        parts.append(
            f"{s.host} Thunderbolt {p.receptacle} ({p.iface or 'no enX known'}) is cabled to "
            f"a Mac that is not a host ({p.peer.name} {p.peer.model}, domain {p.peer.domain_uuid})"
        )
    msg = f"no Thunderbolt ring through {', '.join(names)}: " + "; ".join(parts)
    return RingSearch(missing=fix or [], message=msg)


# --------------------------------------------------------------------------------------
# Addresses, commands, hostfile


class LinkEnd(TBModel):
    host: str
    iface: str
    ip: str


class Link(TBModel):
    """One cable with its /30: ``a`` gets the first host address, ``b`` the second."""

    index: int
    network: str  # "192.168.0.4/30"
    a: LinkEnd
    b: LinkEnd

    def end(self, host: str) -> LinkEnd:
        return self.a if self.a.host == host else self.b

    def other(self, host: str) -> LinkEnd:
        return self.b if self.a.host == host else self.a


class ThunderboltPlan(TBModel):
    ring: list[str]  # rank order
    links: list[Link]  # ring hops first (link k joins rank k and k+1), then other cables
    commands: dict[str, list[str]]  # per host, shell commands to set the addresses
    hostfile: dict[str, Any]  # MLX ring hostfile + per-host "links"


def plan_thunderbolt_ring(
    hosts: Union[CableGraph, Mapping[str, HostInput]], base: str = DEFAULT_BASE
) -> ThunderboltPlan:
    """Ring, one /30 per cable, the commands that set them, and the hostfile.

    Addressing follows ``mlx.distributed_config``: link k gets ``base + 4k + 1`` and
    ``+ 2``, netmask 255.255.255.252, and each host runs ``ifconfig <bridge> down`` (the
    Thunderbolt Bridge otherwise owns the ports), ``ifconfig enX inet ...`` and ``route
    change <peer> -interface enX``. In the hostfile rank i's ``ips`` are its addresses on
    the cables to rank i-1, ``cables_per_hop`` of them, the same count on every rank as
    MLX's ring requires.
    """
    graph = hosts if isinstance(hosts, CableGraph) else build_cable_graph(hosts)
    search = find_ring(graph)
    if not search.ok:
        raise NoRingError(search)
    ring = search.ring
    assert ring is not None
    # Ring hops first, each oriented from rank k to rank k+1, so link k is predictable.
    ring_ends = [c.oriented(x) for x, y in _hops(tuple(ring)) for c in graph.between(x, y)]
    no_iface = [f"{e.host} Thunderbolt {e.receptacle}" for pair in ring_ends for e in pair
                if not e.iface]
    if no_iface:
        raise TopologyError(
            "no network interface (networksetup 'Thunderbolt <N>') for ring port(s): "
            + ", ".join(no_iface)
        )
    used = {frozenset((a.domain_uuid, b.domain_uuid)) for a, b in ring_ends}
    ring_ends += [(c.a, c.b) for c in graph.cables if c.a.iface and c.b.iface
                  and frozenset((c.a.domain_uuid, c.b.domain_uuid)) not in used]
    start = int(ipaddress.IPv4Address(base))
    links = []
    for k, (a, b) in enumerate(ring_ends):
        net = ipaddress.IPv4Network((start + 4 * k, 30))
        links.append(Link(
            index=k, network=str(net),
            a=LinkEnd(host=a.host, iface=a.iface, ip=str(net[1])),
            b=LinkEnd(host=b.host, iface=b.iface, ip=str(net[2])),
        ))
    commands, entries = {}, []
    for i, h in enumerate(ring):
        own = [ln for ln in links if h in (ln.a.host, ln.b.host)]
        cmds = [f"sudo ifconfig {graph.parsed[h].bridge or 'bridge0'} down"]
        for ln in own:
            me, peer = ln.end(h), ln.other(h)
            cmds.append(f"sudo ifconfig {me.iface} inet {me.ip} netmask {NETMASK_30}")
            cmds.append(f"sudo route change {peer.ip} -interface {me.iface}")
        commands[h] = cmds
        left = ring[i - 1]
        to_left = [ln.end(h).ip for ln in own if ln.other(h).host == left]
        entries.append({
            "ssh": h,
            "ips": to_left[: search.cables_per_hop],
            "links": [{"peer": ln.other(h).host, "iface": ln.end(h).iface,
                       "ip": f"{ln.end(h).ip}/30"} for ln in own],
        })
    hostfile = {"backend": "ring", "envs": [], "hosts": entries}
    return ThunderboltPlan(ring=ring, links=links, commands=commands, hostfile=hostfile)


# --------------------------------------------------------------------------------------
# RDMA over the same cables (JACCL)


def rdma_device(iface: str) -> str:
    """The RDMA device of the Thunderbolt port whose network interface is ``iface``.

    MLX's own rule (``configure_jaccl`` in ``mlx/_distributed_utils/config.py``):
    ``rdma_`` + the BSD device that ``networksetup -listallhardwareports`` gives the
    port "Thunderbolt <receptacle>". No recording shows ``networksetup`` and
    ``ibv_devices`` of the same Mac (tests/fixtures/macos/SOURCES.md), so the name is
    only ever *checked* against that host's ``ibv_devices``, never assumed to exist.
    """
    return f"rdma_{iface}"


class RdmaPlan(TBModel):
    """What ``mlx.distributed_config`` would write for the cables of a ``ThunderboltPlan``."""

    backend: str  # "jaccl" (every pair cabled), "jaccl-ring" (ring neighbours only) or "ring" (no RDMA)
    rdma: Optional[list[list[Any]]] = None  # rows and columns in ring order, null on the diagonal
    reason: str  # one line: why this backend


def plan_rdma(plan: ThunderboltPlan, devices: Mapping[str, Optional[list[str]]]) -> RdmaPlan:
    """The ``rdma`` matrix of the planned cables, from each host's ``ibv_devices`` device list.

    ``devices[host]`` is None when ``ibv_devices`` could not be run there. Any host
    without devices: no matrix, the ring backend (as ``mlx.distributed_config`` decides).
    Otherwise every cable end's device (``rdma_device``) must be listed on its host, or
    ``TopologyError`` names the host, port and device: a hostfile naming a device that
    does not exist makes stock MLX segfault at start (exo#2186). Several cables between
    two hosts give a list of devices, the same count for every pair (MLX's ``count``).
    """
    ring = plan.ring
    n = len(ring)
    none = [h for h in ring if not devices.get(h)]
    if none:
        why = "; ".join(f"{h}: {'no ibv_devices output' if devices.get(h) is None else 'ibv_devices lists no device'}"
                        for h in none)
        return RdmaPlan(backend="ring", reason=f"no RDMA over Thunderbolt on every host ({why}): ring over TCP")
    ends: dict[tuple[str, str], list[str]] = {}  # (host, peer) -> that host's devices towards peer, in link order
    for ln in plan.links:
        for me, peer in ((ln.a, ln.b), (ln.b, ln.a)):
            dev = rdma_device(me.iface)
            listed = devices[me.host] or []
            if dev not in listed:
                raise TopologyError(
                    f"{me.host}: ibv_devices does not list {dev}, the RDMA device MLX names after {me.iface} (the port "
                    f"cabled to {peer.host}); it lists {', '.join(listed)}. Is RDMA enabled and the cable on a "
                    "Thunderbolt 5 port? (orch check --hostfile ... --backend jaccl checks every host)")
            ends.setdefault((me.host, peer.host), []).append(dev)
    pairs = [(x, y) for x in ring for y in ring if x != y]
    mesh = all((x, y) in ends for x, y in pairs)
    neighbours = {(ring[i], ring[(i + d) % n]) for i in range(n) for d in (-1, 1)}
    used = pairs if mesh else [p for p in pairs if p in neighbours]
    count = min(len(ends[p]) for p in used)
    rows = []
    for x in ring:
        row: list[Any] = []
        for y in ring:
            devs = ends.get((x, y), [])[:count] if (x, y) in used else []
            row.append(None if not devs else devs[0] if count == 1 else devs)
        rows.append(row)
    if mesh:
        return RdmaPlan(backend="jaccl", rdma=rows,
                        reason=f"every pair of the {n} hosts is cabled and every host lists its RDMA devices: jaccl")
    return RdmaPlan(backend="jaccl-ring", rdma=rows,
                    reason="the cables form a ring but not a full mesh, and every host lists its RDMA devices: jaccl-ring")
