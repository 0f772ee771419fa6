"""Parsers for plain macOS command output: ``networksetup``, ``ifconfig`` and the Metal
device info that MLX prints.

Why separate from ``thunderbolt.py``: these are generic, and the rank runtime reuses
:func:`metal_memory_from_dict` on ``mx.device_info()``; so this module uses only the
standard library (no pydantic: a rank must import fast, see ``protocol.py``).

Every format here was checked against recorded real output in
``tests/fixtures/macos/`` (provenance in its ``SOURCES.md``).
"""

from __future__ import annotations

import ast
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

# --------------------------------------------------------------------------------------
# networksetup -listallhardwareports


def parse_hardware_ports(text: str) -> dict[str, str]:
    """``networksetup -listallhardwareports`` -> {hardware port name: BSD device}.

    The output is blocks of ``Hardware Port: <name>`` / ``Device: <dev>`` /
    ``Ethernet Address: ...``. Thunderbolt ports are called ``Thunderbolt <N>`` where N
    is the receptacle id that ``system_profiler SPThunderboltDataType`` reports (MLX's
    ``mlx.distributed_config`` relies on the same correspondence), and the bridge that
    macOS builds over them is ``Thunderbolt Bridge`` (usually ``bridge0``).
    """
    ports: dict[str, str] = {}
    name: Optional[str] = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Hardware Port:"):
            name = line.partition(":")[2].strip()
        elif line.startswith("Device:") and name is not None:
            ports[name] = line.partition(":")[2].strip()
            name = None
    return ports


_TB_PORT = re.compile(r"^Thunderbolt (\d+)$")


def thunderbolt_devices(ports: Mapping[str, str]) -> dict[str, str]:
    """{receptacle id ("1", "2", ...): BSD device} from :func:`parse_hardware_ports`."""
    out = {}
    for name, dev in ports.items():
        m = _TB_PORT.match(name)
        if m:
            out[m.group(1)] = dev
    return out


# --------------------------------------------------------------------------------------
# ifconfig


@dataclass
class Interface:
    """One interface block of macOS ``ifconfig`` (``-a`` and ``-v`` forms)."""

    name: str
    flags: list[str] = field(default_factory=list)
    mtu: Optional[int] = None
    ether: Optional[str] = None
    inet: list[ipaddress.IPv4Interface] = field(default_factory=list)
    inet6: list[str] = field(default_factory=list)
    status: Optional[str] = None  # "active" / "inactive"; absent on lo0, utun, gif
    members: list[str] = field(default_factory=list)  # bridge members (bridge0: en1..)
    type: Optional[str] = None  # only with -v, e.g. "IP over Thunderbolt"

    @property
    def up(self) -> bool:
        return "UP" in self.flags

    @property
    def active(self) -> bool:
        return self.status == "active"


_IF_HEADER = re.compile(r"^(\S+): flags=[0-9a-fA-F]+<([^>]*)>(?: mtu (\d+))?")
_INET = re.compile(r"^inet (\S+)(?: --> \S+)? netmask (0x[0-9a-fA-F]+)")


def parse_ifconfig(text: str) -> dict[str, Interface]:
    """macOS ``ifconfig`` output -> {name: Interface}.

    Interface blocks start at column 0 (``en2: flags=8963<UP,...> mtu 1500``); every
    indented line belongs to the block above. The netmask is printed in hex
    (``0xfffffffc``), hence the conversion to a prefix length.
    """
    out: dict[str, Interface] = {}
    cur: Optional[Interface] = None
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if not raw[0].isspace():
            m = _IF_HEADER.match(raw)
            if m is None:
                cur = None
                continue
            flags = [f for f in m.group(2).split(",") if f]
            cur = Interface(m.group(1), flags, int(m.group(3)) if m.group(3) else None)
            out[cur.name] = cur
            continue
        if cur is None:
            continue
        line = raw.strip()
        if (m := _INET.match(line)) is not None:
            prefix = bin(int(m.group(2), 16)).count("1")
            cur.inet.append(ipaddress.IPv4Interface(f"{m.group(1)}/{prefix}"))
        elif line.startswith("inet6 "):
            cur.inet6.append(line.split()[1])
        elif line.startswith("ether "):
            cur.ether = line.split()[1]
        elif line.startswith("status:"):
            cur.status = line.partition(":")[2].strip()
        elif line.startswith("member:"):
            cur.members.append(line.split()[1])
        elif line.startswith("type:"):
            cur.type = line.partition(":")[2].strip()
    return out


# --------------------------------------------------------------------------------------
# Metal device info


@dataclass(frozen=True)
class MetalMemory:
    """GPU memory facts of a Mac, in bytes. ``memory_size`` is None on MLX versions
    whose ``mx.metal.device_info()`` did not report it yet (first version, mlx#1060)."""

    memory_size: Optional[int]
    max_recommended_working_set_size: Optional[int]


_KEYS = ("memory_size", "max_recommended_working_set_size")


def metal_memory_from_dict(info: Mapping[str, Any]) -> MetalMemory:
    """The dict of ``mx.device_info()`` / ``mx.metal.device_info()`` -> MetalMemory.

    Raises ValueError when neither memory key is present: a caller that budgets memory
    must not silently get "unknown" from a dict of the wrong shape.
    """
    vals = {k: int(info[k]) if info.get(k) is not None else None for k in _KEYS}
    if all(v is None for v in vals.values()):
        raise ValueError(f"no memory_size or max_recommended_working_set_size in {dict(info)!r}")
    return MetalMemory(**vals)


_KV_LINE = re.compile(r"^\s*([A-Za-z_]\w*)\s*:\s*(\S.*?)\s*$")


def parse_metal_device_info(info: Union[str, Mapping[str, Any]]) -> MetalMemory:
    """Metal device info as a dict, as MLX's Python repr of that dict
    (``{'max_recommended_working_set_size': 188743680000, ...}``), or as ``key: value``
    lines (the mlx-c example tool's format) -> MetalMemory."""
    if isinstance(info, Mapping):
        return metal_memory_from_dict(info)
    text = info.strip()
    start = text.find("{")
    if start >= 0:
        # literal_eval, never eval: this text comes from another machine.
        parsed = ast.literal_eval(text[start : text.rindex("}") + 1])
        if isinstance(parsed, dict):
            return metal_memory_from_dict(parsed)
    pairs = {}
    for line in text.splitlines():
        m = _KV_LINE.match(line)
        if m and m.group(1) in _KEYS:
            pairs[m.group(1)] = m.group(2)
    return metal_memory_from_dict(pairs)
