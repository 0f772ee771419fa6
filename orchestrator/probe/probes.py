"""How ``orch check`` starts its probe on a host, and how the probe's answers are read.

The probe itself is ``probe_host.py`` (standard library only), sent as source on the
command line: ``PYTHON -c <probe_host.py> MODE CONFIG_JSON``, through a local subprocess
or an SSH session, so nothing is staged and it runs under the interpreter the run will
use. It answers with one ``ORCHCHECK {json}`` line; command outputs inside it are raw
(``ip -j addr show`` / ``ifconfig``, ``ip -j route get`` / ``route -n get``) and parsed
here, on the controller, where they are tested against recorded output.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

from orchestrator.probe.macos import parse_ifconfig
from orchestrator.probe.probe_host import MARKER

PROBE_PATH = Path(__file__).with_name("probe_host.py")


@lru_cache(maxsize=1)
def probe_source() -> str:
    """The probe program's source, as it travels on the command line."""
    return PROBE_PATH.read_text(encoding="utf-8")


def probe_argv(python: str, mode: str, config: dict) -> list[str]:
    """The command line of one probe (the program travels on it: nothing is staged)."""
    return [python, "-c", probe_source(), mode, json.dumps(config, separators=(",", ":"))]


def parse_report(line: str) -> Optional[dict]:
    """One ``ORCHCHECK {json}`` line -> dict; anything else (login banners, warnings) -> None."""
    idx = line.find(MARKER)
    if idx < 0:
        return None
    try:
        obj = json.loads(line[idx + len(MARKER):])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


# ----------------------------------------------------------------------------- interfaces


@dataclass
class Iface:
    name: str
    up: bool                      # administratively up and with carrier (macOS: status active)
    state: str                    # words: "up", "down", "no carrier", "inactive"
    addrs: list[Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]] = field(default_factory=list)

    def holds(self, ip: str) -> bool:
        return any(str(a.ip) == ip for a in self.addrs)

    def on_subnet_of(self, ip: str) -> Optional[Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]]:
        """This interface's address whose network contains ``ip`` (a directly connected peer), or None."""
        target = ipaddress.ip_address(ip)
        for a in self.addrs:
            if a.version == target.version and target in a.network and a.network.prefixlen < a.max_prefixlen:
                return a
        return None


def parse_linux_addrs(text: str) -> list[Iface]:
    """``ip -j addr show`` -> interfaces."""
    out = []
    for link in json.loads(text or "[]"):
        flags = link.get("flags") or []
        oper = (link.get("operstate") or "").upper()
        admin_up = "UP" in flags
        carrier = "NO-CARRIER" not in flags and oper not in ("DOWN", "LOWERLAYERDOWN")
        state = "up" if admin_up and carrier else ("down" if not admin_up else "no carrier")
        addrs = []
        for a in link.get("addr_info") or []:
            if a.get("family") in ("inet", "inet6") and a.get("local"):
                try:
                    addrs.append(ipaddress.ip_interface(f"{a['local']}/{a.get('prefixlen', 32)}"))
                except ValueError:
                    pass
        out.append(Iface(name=link.get("ifname", "?"), up=admin_up and carrier, state=state, addrs=addrs))
    return out


def parse_macos_addrs(text: str) -> list[Iface]:
    """macOS ``ifconfig`` -> interfaces (via ``orchestrator.probe.macos.parse_ifconfig``)."""
    out = []
    for name, i in parse_ifconfig(text).items():
        active = i.status in (None, "active")
        state = "up" if i.up and active else ("down" if not i.up else "inactive (no cable or peer)")
        out.append(Iface(name=name, up=i.up and active, state=state, addrs=list(i.inet)))
    return out


def parse_ifaces(raw: Optional[dict], system: str) -> Optional[list[Iface]]:
    """A probe's ``ifaces`` field (raw command result) -> interfaces, or None when the command failed."""
    if not raw or raw.get("rc") != 0:
        return None
    try:
        return parse_macos_addrs(raw["out"]) if system == "Darwin" else parse_linux_addrs(raw["out"])
    except (ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- routes


@dataclass
class Route:
    dev: Optional[str] = None        # interface the kernel sends through
    src: Optional[str] = None        # preferred source address (Linux only)
    gateway: Optional[str] = None    # next hop when not directly connected
    destination: Optional[str] = None
    mask: Optional[str] = None
    flags: list[str] = field(default_factory=list)
    error: Optional[str] = None      # no route at all: what the command said


def parse_linux_route(text: str) -> Route:
    """``ip -j route get ADDR`` (iproute2 JSON) -> Route."""
    data = json.loads(text or "[]")
    if not data:
        return Route(error="no route")
    r = data[0]
    if r.get("type") in ("unreachable", "prohibit", "blackhole"):
        return Route(error=f"{r['type']} route", destination=r.get("dst"))
    return Route(dev=r.get("dev"), src=r.get("prefsrc"), gateway=r.get("gateway"), destination=r.get("dst"),
                 flags=list(r.get("flags") or []))


_ROUTE_KV = re.compile(r"^\s*([a-z ]+):\s*(.*?)\s*$")


def parse_macos_route(text: str) -> Route:
    """macOS ``route -n get ADDR`` -> Route.

    The output is ``key: value`` lines right-aligned on the colon (``   route to: ...``,
    ``destination:``, ``mask:``, ``gateway:`` only when there is a next hop,
    ``interface:``, ``flags: <UP,...>``) followed by a metrics table. macOS prints no
    source address; the caller takes it from the interface or the connected socket.
    """
    kv: dict[str, str] = {}
    for line in text.splitlines():
        m = _ROUTE_KV.match(line)
        if m:
            kv[m.group(1).strip()] = m.group(2)
    if "interface" not in kv and "gateway" not in kv:
        return Route(error=text.strip().splitlines()[-1] if text.strip() else "no route")
    flags = kv.get("flags", "").strip("<>")
    return Route(dev=kv.get("interface"), gateway=kv.get("gateway"), destination=kv.get("destination"),
                 mask=kv.get("mask"), flags=[f for f in flags.split(",") if f])


def parse_route(raw: Optional[dict], system: str) -> Optional[Route]:
    """A probe's ``route`` field (raw command result) -> Route; None when the command is missing."""
    if not raw:
        return None
    if raw.get("rc") is None:
        return None
    if raw.get("rc") != 0:
        words = (raw.get("err") or raw.get("out") or "").strip().splitlines()
        return Route(error=(words[-1] if words else f"exit {raw.get('rc')}").removeprefix("RTNETLINK answers: "))
    try:
        return parse_macos_route(raw.get("out", "")) if system == "Darwin" else parse_linux_route(raw.get("out", ""))
    except (ValueError, TypeError, KeyError, IndexError):
        return None


# ----------------------------------------------------------------------------- clock


def clock_offset(samples: list[tuple[float, float, float]]) -> Optional[tuple[float, float]]:
    """(offset, rtt) from (sent, remote time, received) samples: the one with the smallest round trip,
    the remote clock compared with the middle of that round trip (so the error is at most rtt/2)."""
    if not samples:
        return None
    sent, remote, got = min(samples, key=lambda s: s[2] - s[0])
    return remote - (sent + got) / 2, got - sent


def mlx_version_text(report: dict[str, Any]) -> Optional[str]:
    mlx = report.get("mlx") or {}
    return mlx.get("version")
