"""The chain: which hosts a stage visits, in which order, and over which address each hop goes.

Hosts are visited in hostfile order (the ring's order), one stop per machine: hostfile
entries with the same SSH name, user and port (``slots`` or repeated entries) are one disk.
A hop from host A to host B goes over B's address on the cable A shares with it: the
address of B whose subnet one of A's prefixed addresses is on (the Thunderbolt /30 between
neighbours), or, for a hostfile without prefixes, B's first address (MLX's meaning: the address
the ring reaches it at). When no cable joins A and B (the chain closed around a host that
vanished) the hop goes to the address the controller's SSH connection reached B at: the
LAN every host is on. The controller's own leg goes to that address too: it is its link.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from orchestrator.hostfile import Host, Hostfile


@dataclass
class Stop:
    """One machine of the chain."""

    index: int            # its first entry in the hostfile
    host: Host

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def key(self) -> tuple:
        return ("\0local",) if self.host.is_local else (self.host.name, self.host.user, self.host.port)


def stops(hostfile: Hostfile) -> list[Stop]:
    seen: set = set()
    out = []
    for i, h in enumerate(hostfile.hosts):
        s = Stop(index=i, host=h)
        if s.key in seen:
            continue
        seen.add(s.key)
        out.append(s)
    return out


def _nets(host: Host) -> dict:
    out = {}
    for ip in host.ips:
        if "/" in ip:
            iface = ipaddress.ip_interface(ip)
            if iface.network.prefixlen < iface.max_prefixlen:
                out[iface.network] = str(iface.ip)
    return out


def hop_address(frm: Host, to: Host, fallback: str) -> tuple[str, str]:
    """(address, why) host ``frm`` sends to ``to`` at; ``fallback`` is where the controller reached ``to``."""
    if to.is_local and frm.is_local:
        return "127.0.0.1", "loopback"
    shared = _nets(frm).keys() & _nets(to).keys()
    if shared:
        net = sorted(shared, key=str)[0]
        return _nets(to)[net], "ring"
    if to.ips and not any("/" in ip for ip in to.ips):
        return to.bare_ips[0], "ips"
    return fallback, "lan"


def chain_hops(chain: list[Stop], fallback: dict[int, str],
               lan: frozenset = frozenset()) -> list[Optional[tuple[str, str]]]:
    """For each stop, (address, why) it forwards to (None for the last). A hop in ``lan`` (stop indices (from, to):
    its cable failed while both hosts lived) goes to the address SSH reached the next host at."""
    out: list[Optional[tuple[str, str]]] = []
    for k, s in enumerate(chain):
        if k + 1 == len(chain):
            out.append(None)
        else:
            nxt = chain[k + 1]
            if (s.index, nxt.index) in lan:
                out.append((fallback[nxt.index], "lan"))
            else:
                out.append(hop_address(s.host, nxt.host, fallback[nxt.index]))
    return out
