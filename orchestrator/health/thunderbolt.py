"""Thunderbolt topology of a set of Macs: cables, a ring through them, its addresses.

Why: MLX's ring backend over Thunderbolt needs (1) a cable ring through all hosts, (2) a
small subnet per cable, set on the right ``enX`` at both ends, and (3) a hostfile in
which rank i lists its own address on the cable to rank i-1 (in
``mlx/distributed/ring/ring.cpp`` rank i accepts on its own hostfile entry and
connects to the entry of rank i+1). ``mlx.distributed_config`` does this interactively
over SSH and says only "Could not find a full ring". Here it is pure functions of the
command outputs, so ``orch check`` can say *which* cable is missing, and it can be
tested on Linux against recorded macOS output (``tests/fixtures/macos/``).

How the outputs identify each other (checked on the recorded TB5 pair):

* ``system_profiler SPThunderboltDataType -json`` has one entry per Thunderbolt bus of
  this Mac, one receptacle each. ``domain_uuid_key`` identifies that *bus*, not the Mac.
  A Mac cabled to the bus appears in its ``_items`` with the ``domain_uuid_key`` of the
  bus at the *other* end. So a cable is two bus UUIDs that name each other, and a Mac is
  the set of its bus UUIDs. Items without a domain UUID are drives, docks, displays.
* Beware the names: on a bus entry ``device_name_key`` is the marketing name of *this*
  Mac ("Mac Studio"); on a peer item it is the model id ("Mac15,14") and ``_name`` is
  the marketing name.
* ``receptacle_1_tag.receptacle_id_key`` N is the port ``networksetup
  -listallhardwareports`` calls "Thunderbolt N" -> BSD device ``enX`` (as MLX maps it).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .macos import parse_hardware_ports, thunderbolt_devices

NETMASK_30 = "255.255.255.252"
DEFAULT_BASE = "192.168.0.0"  # mlx.distributed_config's first /30 is 192.168.0.1/.2


class TopologyError(ValueError):
    """The outputs cannot describe a usable Thunderbolt setup (message says why)."""


class NoRingError(TopologyError):
    """No cable ring through all hosts; ``.search`` holds the diagnosis."""

    def __init__(self, search: "RingSearch"):
        super().__init__(search.message)
        self.search = search


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------
# One host: system_profiler (+ networksetup)


class PeerMac(_Model):
    """A Mac at the far end of a cable, as the near end sees it."""

    domain_uuid: str  # the far end's bus UUID
    name: Optional[str] = None  # marketing name, "Mac Studio"
    model: Optional[str] = None  # model id, "Mac15,14"


class TBPort(_Model):
    """One Thunderbolt bus/receptacle of a Mac."""

    bus: str  # "thunderboltusb4_bus_1"
    domain_uuid: str
    switch_uid: Optional[str] = None
    receptacle: Optional[str] = None  # "Thunderbolt <receptacle>" in networksetup
    status: Optional[str] = None  # "receptacle_connected" (json) / "Device connected" (text)
    speed: Optional[str] = None  # "80 Gb/s" when cabled, "Up to 120 Gb/s" when empty
    peer: Optional[PeerMac] = None
    devices: list[str] = Field(default_factory=list)  # non-Mac devices (drives, docks)
    iface: Optional[str] = None  # BSD device, once networksetup output is known


class TBHost(_Model):
    """What one Mac knows about its Thunderbolt ports."""

    name: Optional[str] = None  # marketing name from the bus entries, "MacBook Pro"
    ports: list[TBPort]
    bridge: Optional[str] = None  # device of "Thunderbolt Bridge" (bridge0)
    hardware_ports: dict[str, str] = Field(default_factory=dict)

    @property
    def domain_uuids(self) -> set[str]:
        return {p.domain_uuid for p in self.ports}


def find_peer_mac(items: list[dict[str, Any]]) -> Optional[PeerMac]:
    """The first Mac (an item with ``domain_uuid_key``) in a bus's ``_items``, searched
    depth-first: a transparent hub nests the peer one level deeper on one side only
    (exo-explore/exo#1982)."""
    for item in items:
        if item.get("domain_uuid_key"):
            return PeerMac(
                domain_uuid=item["domain_uuid_key"],
                name=item.get("_name"),
                model=item.get("device_name_key"),
            )
        nested = find_peer_mac(item.get("_items", []))
        if nested is not None:
            return nested
    return None


def _other_devices(items: list[dict[str, Any]]) -> list[str]:
    out = []
    for item in items:
        if not item.get("domain_uuid_key"):
            out.append(item.get("_name", "?"))
            out.extend(_other_devices(item.get("_items", [])))
    return out


def _sort_key(p: TBPort) -> tuple[int, str]:
    rec = p.receptacle or ""
    return (int(rec) if rec.isdigit() else 1 << 30, p.bus)


def parse_sp_thunderbolt(data: Union[str, bytes, Mapping[str, Any]]) -> TBHost:
    """``system_profiler SPThunderboltDataType -json`` (text or loaded) -> TBHost.

    Entries without ``domain_uuid_key`` are skipped: some accessories (e.g. displays)
    show up as entries without one, which crashed MLX before ml-explore/mlx#2682.
    """
    if isinstance(data, (str, bytes)):
        data = json.loads(data)
    ports, name = [], None
    for e in data.get("SPThunderboltDataType", []):
        if not e.get("domain_uuid_key"):
            continue
        name = name or e.get("device_name_key")
        tag = e.get("receptacle_1_tag") or {}
        items = e.get("_items", [])
        ports.append(
            TBPort(
                bus=e.get("_name", ""),
                domain_uuid=e["domain_uuid_key"],
                switch_uid=e.get("switch_uid_key"),
                receptacle=tag.get("receptacle_id_key"),
                status=tag.get("receptacle_status_key"),
                speed=tag.get("current_speed_key"),
                peer=find_peer_mac(items),
                devices=_other_devices(items),
            )
        )
    return TBHost(name=name, ports=sorted(ports, key=_sort_key))


_TEXT_BUS = re.compile(r"^Thunderbolt(?:/USB4)? Bus (\d+):$")


def parse_sp_thunderbolt_text(text: str) -> TBHost:
    """Plain ``system_profiler SPThunderboltDataType`` (no -json) -> TBHost.

    For outputs users paste into issues. Indentation carries the structure: bus fields
    and ``Port:`` sit one level under the bus header, port fields deeper, and a cabled
    device is a ``<Name>:`` header one level under the bus fields, its fields one level
    deeper. Only directly cabled devices are read (the JSON form is the primary input).
    Bus names are normalised to the JSON's ``thunderboltusb4_bus_<n>``.
    """
    buses: list[dict[str, Any]] = []
    bus: Optional[dict[str, Any]] = None
    field_indent = section = dev = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        m = _TEXT_BUS.match(line)
        if m:
            bus = {"bus": f"thunderboltusb4_bus_{m.group(1)}", "devices": []}
            buses.append(bus)
            field_indent, section, dev = None, "bus", None
            continue
        if bus is None:
            continue
        key, _, value = (s.strip() for s in line.partition(":"))
        field_indent = field_indent if field_indent is not None else indent
        if indent == field_indent:
            section = "port" if line == "Port:" else "bus"
            if value:
                bus[key] = value
        elif indent == field_indent + 2 and not value:  # "Mac Studio:" header
            dev = {"_name": key, "indent": indent}
            bus["devices"].append(dev)
            section = "device"
        elif section == "port" and value:
            bus["port:" + key] = value
        elif section == "device" and dev is not None and indent == dev["indent"] + 2 and value:
            dev[key] = value
    ports, name = [], None
    for b in buses:
        if "Domain UUID" not in b:
            continue
        name = name or b.get("Device Name")
        macs = [d for d in b["devices"] if d.get("Domain UUID")]
        peer = None
        if macs:
            peer = PeerMac(
                domain_uuid=macs[0]["Domain UUID"],
                name=macs[0]["_name"],
                model=macs[0].get("Device Name"),
            )
        ports.append(
            TBPort(
                bus=b["bus"],
                domain_uuid=b["Domain UUID"],
                switch_uid=b.get("UID"),
                receptacle=b.get("port:Receptacle"),
                status=b.get("port:Status"),
                speed=b.get("port:Speed"),
                peer=peer,
                devices=[d["_name"] for d in b["devices"] if not d.get("Domain UUID")],
            )
        )
    return TBHost(name=name, ports=sorted(ports, key=_sort_key))


def parse_host(
    sp_thunderbolt: Union[str, bytes, Mapping[str, Any]],
    networksetup_text: Optional[str] = None,
) -> TBHost:
    """One Mac from its ``system_profiler SPThunderboltDataType`` output (JSON, loaded
    JSON, or the plain text form) and, optionally, its ``networksetup
    -listallhardwareports`` output, which gives each port its ``enX``."""
    if isinstance(sp_thunderbolt, Mapping) or sp_thunderbolt.lstrip()[:1] in ("{", b"{"):
        host = parse_sp_thunderbolt(sp_thunderbolt)
    else:
        host = parse_sp_thunderbolt_text(sp_thunderbolt)
    if networksetup_text is None:
        return host
    hw = parse_hardware_ports(networksetup_text)
    devs = thunderbolt_devices(hw)
    ports = [p.model_copy(update={"iface": devs.get(p.receptacle or "")}) for p in host.ports]
    return host.model_copy(
        update={"ports": ports, "bridge": hw.get("Thunderbolt Bridge"), "hardware_ports": hw}
    )


# --------------------------------------------------------------------------------------
# Several hosts: the cable graph


class CableEnd(_Model):
    host: str
    bus: str
    receptacle: Optional[str] = None
    iface: Optional[str] = None
    domain_uuid: str


class Cable(_Model):
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


class StrayCable(_Model):
    """A port cabled to a Mac that is not one of the hosts."""

    host: str
    port: TBPort


class CableGraph(_Model):
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


class RingSearch(_Model):
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


class LinkEnd(_Model):
    host: str
    iface: str
    ip: str


class Link(_Model):
    """One cable with its /30: ``a`` gets the first host address, ``b`` the second."""

    index: int
    network: str  # "192.168.0.4/30"
    a: LinkEnd
    b: LinkEnd

    def end(self, host: str) -> LinkEnd:
        return self.a if self.a.host == host else self.b

    def other(self, host: str) -> LinkEnd:
        return self.b if self.a.host == host else self.a


class ThunderboltPlan(_Model):
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


class RdmaPlan(_Model):
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
