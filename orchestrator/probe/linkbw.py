"""Measure the bandwidth of every link between the hosts of a hostfile (``--ring-order measured``).

What is a link: for two hosts whose addresses carry prefix lengths, every subnet they share
(a Thunderbolt cable's /30, the Ethernet's /24) is one *path*; for hosts without prefixes,
their first addresses. Each path is measured both ways for ``seconds`` (TCP, a plain
stream of bytes from a standard-library probe, ``probe_host.py``'s ``linkbw`` mode), one direction
after the other, counted by the receiver, so the number is what the wire delivered and not what
the sender's socket buffer swallowed.

Paths are measured in rounds in which every host takes part in at most one path, so that no
two measurements share a host's CPU or NIC (a full mesh of N hosts takes N-1 rounds; each
round lasts about 2 x ``seconds``). The result is a ``ringorder.LinkMatrix``; ``ringorder`` then
chooses the ring.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from typing import TYPE_CHECKING, Optional

from orchestrator.probe.runner import REMOTE_PYTHON, ProbeFailed, Runner, read_report
from orchestrator.plan.ringorder import LinkMatrix, PathMeasurement

if TYPE_CHECKING:
    from orchestrator.hostfile import Host, Hostfile
    from orchestrator.remote.ssh import SSHOptions

DEFAULT_SECONDS = 0.3


def machine(host: "Host") -> str:
    """Entries on one machine share a key: every local entry is this machine; others by SSH name."""
    return "\0local" if host.is_local else host.name


def same_machine_pairs(hosts: list["Host"]) -> list[tuple[int, int]]:
    return [(a, b) for a in range(len(hosts)) for b in range(a + 1, len(hosts)) if machine(hosts[a]) == machine(hosts[b])]


def candidate_paths(hosts: list["Host"]) -> list[tuple[int, int, str, str]]:
    """(a, b, ip_a, ip_b) for every pair a < b on different machines and every way they are connected (see above)."""
    out = []
    for a in range(len(hosts)):
        for b in range(a + 1, len(hosts)):
            ha, hb = hosts[a], hosts[b]
            if not ha.ips or not hb.ips or machine(ha) == machine(hb):
                continue
            pa = [ipaddress.ip_interface(ip) for ip in ha.ips if "/" in ip]
            pb = [ipaddress.ip_interface(ip) for ip in hb.ips if "/" in ip]
            shared = [(x, y) for x in pa for y in pb if x.network == y.network and x.ip != y.ip
                      and x.network.prefixlen < x.max_prefixlen]
            if shared:
                out += [(a, b, str(x.ip), str(y.ip)) for x, y in shared]
            elif not pa and not pb:
                out.append((a, b, ha.bare_ips[0], hb.bare_ips[0]))
    return out


def rounds_of(paths: list[tuple[int, int, str, str]]) -> list[list[tuple[int, int, str, str]]]:
    """Greedy: each path in the first round where neither host is busy (a full mesh of 4: 3 rounds)."""
    rounds: list[list] = []
    busy: list[set] = []
    for p in paths:
        for r, used in zip(rounds, busy):
            if p[0] not in used and p[1] not in used:
                r.append(p)
                used.update(p[:2])
                break
        else:
            rounds.append([p])
            busy.append(set(p[:2]))
    return rounds


def _rate(res: dict) -> Optional[float]:
    if res.get("error") or not res.get("seconds"):
        return None
    return res["bytes"] * 8 / res["seconds"] / 1e9


async def measure_links(hostfile: "Hostfile", runners: dict[int, Runner], *, seconds: float = DEFAULT_SECONDS,
                        timeout: float = 15.0, connect_timeout: float = 3.0) -> LinkMatrix:
    """Every path between the hosts with a runner, measured; paths touching a host without one are reported failed."""
    t0 = time.monotonic()
    hosts = hostfile.hosts
    names = [h.name for h in hosts]
    paths = candidate_paths(hosts)
    results = {p: PathMeasurement(a=p[0], b=p[1], ip_a=p[2], ip_b=p[3]) for p in paths}
    listen: dict[int, set[str]] = {}
    for a, b, ia, ib in paths:
        listen.setdefault(a, set()).add(ia)
        listen.setdefault(b, set()).add(ib)
    per_send = 4 * seconds + connect_timeout + 10
    deadline = per_send * (len(paths) + 1) + timeout
    procs: dict = {}
    ports: dict[int, dict] = {}
    failed: dict[int, str] = {}

    async def start(i: int) -> None:
        runner = runners.get(i)
        if runner is None:
            failed[i] = f"no link probe could run on {names[i]} (not reachable, or no python there)"
            return
        cfg = {"listen": sorted(listen[i]), "seconds": seconds, "connect_timeout": connect_timeout, "deadline": deadline}
        try:
            proc = await runner.start("linkbw", cfg)
            procs[i] = proc
            ports[i] = (await read_report(proc, timeout)).get("ports") or {}
        except ProbeFailed as e:
            failed[i] = f"the link probe on {names[i]} did not start: {e}"

    async def send(i: int, j: int, ip: str, key) -> Optional[float]:
        """Host i sends to host j's ``ip``; the rate j counted, or None (the error goes into the path)."""
        port = ports.get(j, {}).get(ip)
        if i in failed or j in failed:
            results[key].error = failed.get(i) or failed.get(j)
            return None
        if not isinstance(port, int):
            results[key].error = f"{names[j]} cannot listen on {ip}: {(port or {}).get('error', 'not reported')}"
            return None
        proc = procs[i]
        proc.write(json.dumps({"id": f"{i}-{j}", "ip": ip, "port": port}) + "\n")
        try:
            res = await read_report(proc, per_send)
        except ProbeFailed as e:
            results[key].error = f"{names[i]} -> {names[j]} {ip}: {e}"
            failed[i] = f"the link probe on {names[i]} failed: {e}"
            return None
        rate = _rate(res)
        if rate is None:
            results[key].error = f"{names[i]} -> {names[j]} {ip}: {res.get('error') or 'nothing arrived'}"
        return rate

    try:
        await asyncio.gather(*(start(i) for i in sorted(listen)))
        for rnd in rounds_of(paths):
            async def both(p) -> None:
                a, b, ia, ib = p
                # One direction after the other: at once, each direction's ACKs queue behind the other's data on a
                # slow link and the measurement collapses (a link is full-duplex; the ring's ACKs are small).
                results[p].a_to_b_gbit_s = await send(a, b, ib, p)
                results[p].b_to_a_gbit_s = await send(b, a, ia, p)
            await asyncio.gather(*(both(p) for p in rnd))
    finally:
        await asyncio.gather(*(p.finish() for p in procs.values()), return_exceptions=True)
        for r in runners.values():
            r.kill_all()
    return LinkMatrix(hosts=names, paths=[results[p] for p in paths], same_machine=same_machine_pairs(hosts),
                      seconds=round(time.monotonic() - t0, 3))


def needs_measuring(hostfile: "Hostfile") -> Optional[str]:
    """None when the choice of ring can matter; otherwise why measuring would change nothing."""
    hosts = hostfile.hosts
    if all(h.is_local for h in hosts):
        return "every rank runs on this machine"
    if len({machine(h) for h in hosts}) < 2:
        return "a single host"
    paths = candidate_paths(hosts)
    pairs = {(a, b) for a, b, _, _ in paths}
    if len(hosts) <= 3 and len(paths) == len(pairs):
        return f"{len(hosts)} hosts with one link per pair make only one ring"
    return None


async def measure_hostfile(hostfile: "Hostfile", ssh: "SSHOptions", *, python: Optional[str] = None,
                           seconds: float = DEFAULT_SECONDS, timeout: float = 15.0, err=None) -> LinkMatrix:
    """Connect to every host with ``ssh`` as ``orch run`` does (remote/ssh.py), measure, disconnect.

    A host that cannot be reached is an error naming it (a ring through it could not run either).
    """
    from orchestrator.hostfile import ConfigError

    err = err or sys.stderr
    remote = [i for i, h in enumerate(hostfile.hosts) if not h.is_local]
    conns: dict = {}
    runners: dict[int, Runner] = {}
    try:
        if remote:
            from orchestrator.remote.ssh import connect_hosts

            conns = await connect_hosts(hostfile, ssh, remote, err=err)
            down = [f"{hostfile.hosts[i].name}: {hc.error}" for i, hc in sorted(conns.items()) if not hc.ok]
            if down:
                raise ConfigError("cannot reach " + "; ".join(down))
        for i, h in enumerate(hostfile.hosts):
            py = python or h.python or (sys.executable if h.is_local else REMOTE_PYTHON)
            env = {**hostfile.env, **h.env}
            runners[i] = Runner(h.name, py, env, conn=None if h.is_local else conns[i].conn)
        return await measure_links(hostfile, runners, seconds=seconds, timeout=timeout,
                                   connect_timeout=max(1.0, min(5.0, timeout / 3)))
    finally:
        for r in runners.values():
            r.kill_all()
        if conns:
            from orchestrator.remote.ssh import close_connections

            await close_connections(conns)
