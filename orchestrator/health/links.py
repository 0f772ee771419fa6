"""Ring links: for every edge rank i -> rank i+1, a listener on rank i+1's host at the exact ``ip:port`` of the
plan and a connection to it *from rank i's host*, then one verdict per link in words.

``evaluate_link`` is pure (tested with recorded probe reports); ``check_links`` runs the
listeners and connectors on the hosts and always stops them (stdin EOF, then kill).
"""

from __future__ import annotations

import asyncio
import ipaddress
import platform
import secrets
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from orchestrator import errnos
from orchestrator.probe import probes
from orchestrator.health.verdicts import LinkResult
from orchestrator.probe.runner import REMOTE_PYTHON, ProbeFailed, Proc, Runner, read_report

if TYPE_CHECKING:
    from orchestrator.hostfile import Hostfile


@dataclass
class Edge:
    id: str
    from_rank: int
    to_rank: int
    from_index: int
    to_index: int
    ip: str
    port: int
    subnet: Optional[ipaddress.IPv4Network | ipaddress.IPv6Network]  # from the hostfile's prefix, when it has one
    token: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def ring_edges(hostfile: Hostfile, plan) -> list[Edge]:
    """Rank i connects to every address rank i+1 listens on (MLX's ring)."""
    n = plan.world_size
    from orchestrator import backends

    if not backends.get(plan.backend).ring or n < 2:
        return []
    edges = []
    for r in plan.ranks:
        nxt = plan.ranks[(r.rank + 1) % n]
        entries = hostfile.hosts[nxt.host_index].ips
        for addr in nxt.listen:
            ip, _, port = addr.rpartition(":")
            ip = ip.strip("[]")
            subnet = None
            for e in entries:
                iface = ipaddress.ip_interface(e)
                if str(iface.ip) == ip and "/" in e:
                    subnet = iface.network
            edges.append(Edge(id=f"e{len(edges)}", from_rank=r.rank, to_rank=nxt.rank, from_index=r.host_index,
                              to_index=nxt.host_index, ip=ip, port=int(port), subnet=subnet))
    return edges


def _iface_words(i: probes.Iface, ip_hint: Optional[str] = None) -> str:
    addr = next((a for a in i.addrs if ip_hint and (str(a.ip) == ip_hint or ipaddress.ip_address(ip_hint) in a.network)), None)
    return f"{i.name} ({addr})" if addr else i.name


def _wrong_side_hint(edge: Edge, sender: str, receiver: str, s_ifaces, r_ifaces) -> str:
    """Which of the receiver's addresses the sender *could* reach directly (shares a subnet with)."""
    if not s_ifaces or not r_ifaces:
        return ""
    found = []
    for ri in r_ifaces:
        for a in ri.addrs:
            ip = str(a.ip)
            if ip == edge.ip or a.ip.is_loopback or a.ip.is_link_local:
                continue
            if any(si.on_subnet_of(ip) is not None for si in s_ifaces):
                found.append((a.network.prefixlen < 30, f"{ip} ({ri.name})"))
    if not found:
        return f" {sender} and {receiver} share no subnet at all (no cable between them?)"
    found.sort()
    return f" {receiver}'s addresses on a network {sender} is on: {', '.join(x for _, x in found)}"


def evaluate_link(edge: Edge, names: list[str], *, bind: Optional[dict], conn: Optional[dict], nonce: Optional[str],
                  s_system: str, r_system: str, s_ifaces=None, r_ifaces=None, not_checked: Optional[str] = None) -> LinkResult:
    """One ring edge from what the listener and the connector reported. Pure: tested with recorded outputs."""
    sender, receiver = names[edge.from_index], names[edge.to_index]

    def result(status: str, detail: str, short: str) -> LinkResult:
        return LinkResult(edge.from_rank, edge.to_rank, sender, receiver, edge.address, status, detail, short)

    if not_checked:
        return result("fail", f"not checked: {not_checked}", "not checked")
    # The receiving side: could rank i+1's host listen there at all?
    if bind is not None and not bind.get("bound"):
        err = errnos.errname(bind.get("errno"), r_system)
        if err == "EADDRINUSE":
            holder = (bind.get("holder") or "").strip()
            who = f"; held by: {' '.join(holder.split())[:200]}" if holder else ""
            return result("fail", f"port {edge.port} is already in use on {receiver} at {edge.address}: rank {edge.to_rank} "
                          f"could not listen there{who} (stop that process or pick other ports with --starting-port)",
                          "port in use")
        if err == "EADDRNOTAVAIL":
            mine = sorted({str(a.ip) for i in (r_ifaces or []) for a in i.addrs if not a.ip.is_loopback and not a.ip.is_link_local})
            return result("fail", f"{edge.ip} is not an address of {receiver}, so rank {edge.to_rank} cannot listen there"
                          + (f" ({receiver} has {', '.join(mine)})" if mine else "") + "; fix its \"ips\" in the hostfile",
                          "not its address")
        return result("fail", f"rank {edge.to_rank} cannot listen at {edge.address} on {receiver}: {bind.get('error')}",
                      "cannot listen")
    if conn is None:
        return result("fail", f"{sender} did not report on its connection to {edge.address}", "no report")
    route = probes.parse_route(conn.get("route"), s_system)
    via = ""
    if route is not None and route.dev:
        via = f"via {route.dev}" + (f" gateway {route.gateway}" if route.gateway else "")
    # Link state at both ends: the sender's interface on the target's subnet, the receiver's holding the address.
    s_if = next((i for i in (s_ifaces or []) if i.on_subnet_of(edge.ip) is not None), None)
    r_if = next((i for i in (r_ifaces or []) if i.holds(edge.ip)), None)
    down = []
    if s_if is not None and not s_if.up:
        down.append(f"{sender}'s {_iface_words(s_if, edge.ip)} is {s_if.state}")
    if r_if is not None and not r_if.up:
        down.append(f"{receiver}'s {_iface_words(r_if, edge.ip)} is {r_if.state}")
    if not conn.get("connected"):
        err = errnos.errname(conn.get("errno"), s_system)
        words = errnos.WORDS.get(err or "", conn.get("error") or "failed")
        if down:
            return result("fail", f"link down: {sender} cannot reach {receiver} at {edge.address} ({words}); "
                          + "; ".join(down), "link down")
        if err in ("ENETUNREACH", "EHOSTUNREACH") or (route is not None and route.error):
            why = f"no route from {sender} to {edge.ip}" + (f" ({route.error})" if route is not None and route.error else "")
            hint = _wrong_side_hint(edge, sender, receiver, s_ifaces, r_ifaces)
            return result("fail", f"{sender} cannot reach {receiver} at {edge.address}: {words}, {why}; is it the address "
                          f"on {receiver}'s side of the cable to {sender}?{hint}", "unreachable")
        if err == "ECONNREFUSED":
            return result("fail", f"{sender} -> {edge.address}: connection refused although rank {edge.to_rank}'s test "
                          f"listener runs on {receiver}: {edge.ip} answers from another host, or a firewall rejects it"
                          + (f" ({via})" if via else ""), "refused")
        if err == "ETIMEDOUT":
            return result("fail", f"{sender} -> {edge.address}: no answer (timed out){' ' + via if via else ''}: packets are "
                          "dropped (wrong address, a firewall, or a dead cable)", "timeout")
        return result("fail", f"{sender} -> {edge.address}: {words}{' (' + via + ')' if via else ''}", words)
    src = conn.get("src") or (route.src if route else None)
    if nonce is not None and conn.get("reply") != nonce:
        return result("fail", f"{sender} reached {edge.address}, but not the test listener on {receiver} answered "
                      f"(another host has {edge.ip}, or something forwards that port)", "wrong host")
    ms = conn.get("connect_ms")
    dev = route.dev if route is not None and route.dev else None
    if edge.subnet is not None and src:
        if ipaddress.ip_address(src) not in edge.subnet:
            return result("fail", f"route via the wrong interface: {sender} reaches {edge.address} through "
                          f"{dev or '?'} (source {src}, not on {edge.subnet}); the ring traffic would not use the "
                          f"cable of {edge.subnet}", f"via {dev or src}")
    detail = f"{sender} -> {receiver} {edge.address} " + (f"via {dev} " if dev else "") + (f"from {src} " if src else "")
    detail += f"(connect {ms:.2f} ms)" if isinstance(ms, (int, float)) else ""
    return result("pass", detail.strip(), f"via {dev}" if dev else "ok")


async def check_links(edges: list[Edge], names, hosts, runners, reports, opts) -> list[LinkResult]:
    systems = {i: (reports.get(i) or {}).get("system") or (platform.system() if hosts[i].local else "Linux")
               for i in range(len(hosts))}
    # Link probes need only the standard library: where the run's python failed, try the default one.
    runners = dict(runners)
    for i, r in list(runners.items()):
        if i not in reports:
            fallback = sys.executable if r.local else REMOTE_PYTHON
            if fallback != r.python:
                runners[i] = Runner(r.name, fallback, r.env, conn=r.conn)
            else:
                del runners[i]
    usable = set(runners)
    nonces = {i: secrets.token_hex(8) for i in range(len(hosts))}
    listen_deadline = 3 * opts.timeout + 10
    binds: dict[str, dict] = {}
    listen_ifaces: dict[int, Any] = {}
    listen_fail: dict[int, str] = {}
    listeners: dict[int, Proc] = {}

    def why_unusable(i: int) -> str:
        c = hosts[i].checks
        for name in ("ssh", "python"):
            if name in c and not c[name].ok:
                return f"see {names[i]}'s {name} check"
        return f"no usable python on {names[i]}"

    async def start_listener(i: int) -> None:
        targets = [{"id": e.id, "ip": e.ip, "port": e.port} for e in edges if e.to_index == i]
        try:
            proc = await runners[i].start("listen", {"targets": targets, "nonce": nonces[i], "deadline": listen_deadline})
            listeners[i] = proc
            rep = await read_report(proc, opts.timeout)
        except ProbeFailed as e:
            listen_fail[i] = f"the test listener on {names[i]} did not start: {e}"
            return
        for b in rep.get("bound") or []:
            binds[b["id"]] = b
        listen_ifaces[i] = probes.parse_ifaces(rep.get("ifaces"), systems[i])

    receivers = sorted({e.to_index for e in edges if e.to_index in usable})
    conns_by_id: dict[str, dict] = {}
    connect_ifaces: dict[int, Any] = {}
    connect_fail: dict[int, str] = {}
    try:
        await asyncio.gather(*(start_listener(i) for i in receivers))

        async def connect_from(i: int) -> None:
            mine = [e for e in edges if e.from_index == i and binds.get(e.id, {}).get("bound")]
            if not mine:
                return
            config = {"targets": [{"id": e.id, "ip": e.ip, "port": e.port, "token": e.token} for e in mine],
                      "connect_timeout": opts.connect_timeout, "deadline": opts.connect_timeout + 10}
            try:
                proc = await runners[i].start("connect", config)
                try:
                    rep = await read_report(proc, opts.connect_timeout + opts.timeout)
                finally:
                    await proc.finish()
            except ProbeFailed as e:
                connect_fail[i] = f"the connect probe on {names[i]} failed: {e}"
                return
            for r in rep.get("results") or []:
                conns_by_id[r["id"]] = r
            connect_ifaces[i] = probes.parse_ifaces(rep.get("ifaces"), systems[i])

        senders = sorted({e.from_index for e in edges if e.from_index in usable})
        await asyncio.gather(*(connect_from(i) for i in senders))
    finally:
        await asyncio.gather(*(p.finish() for p in listeners.values()), return_exceptions=True)
        for r in runners.values():
            r.kill_all()

    out = []
    for e in edges:
        not_checked = None
        if e.to_index not in usable:
            not_checked = f"no listener on {names[e.to_index]} ({why_unusable(e.to_index)})"
        elif e.from_index not in usable:
            not_checked = f"nothing can connect from {names[e.from_index]} ({why_unusable(e.from_index)})"
        elif e.to_index in listen_fail:
            not_checked = listen_fail[e.to_index]
        elif e.id not in binds:
            not_checked = f"the listener on {names[e.to_index]} did not report {e.address}"
        elif binds[e.id].get("bound") and e.from_index in connect_fail:
            not_checked = connect_fail[e.from_index]
        s_if = connect_ifaces.get(e.from_index) or listen_ifaces.get(e.from_index)
        r_if = listen_ifaces.get(e.to_index)
        out.append(evaluate_link(e, names, bind=binds.get(e.id), conn=conns_by_id.get(e.id), nonce=nonces[e.to_index],
                                 s_system=systems[e.from_index], r_system=systems[e.to_index],
                                 s_ifaces=s_if, r_ifaces=r_if, not_checked=not_checked))
    # The receiving host's own view: every port its ranks will listen on could be bound.
    for i in receivers:
        if i in listen_fail:
            continue
        mine = [e for e in edges if e.to_index == i]
        bad = [(e, binds[e.id]) for e in mine if e.id in binds and not binds[e.id].get("bound")]
        if bad:
            words = "; ".join(f"{e.address}: {errnos.WORDS.get(errnos.errname(b.get('errno'), systems[i]) or '', b.get('error'))}"
                              + (f" (held by: {' '.join((b.get('holder') or '').split())[:160]})" if b.get("holder") else "")
                              for e, b in bad)
            short = "in use" if any(errnos.errname(b.get("errno"), systems[i]) == "EADDRINUSE" for _, b in bad) else "cannot bind"
            hosts[i].add("ports", "fail", f"rank listen address(es) unusable on {names[i]}: {words}", short)
        elif mine:
            hosts[i].add("ports", "pass", "free: " + ", ".join(e.address for e in mine), "free")
    return out

