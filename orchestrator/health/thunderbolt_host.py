"""One Mac's Thunderbolt ports, from its recorded ``system_profiler`` and ``networksetup`` output.

Pure functions of the command outputs (JSON, or the plain text users paste
into issues), so they are tested on Linux against recorded macOS output
(``tests/fixtures/macos/``). ``thunderbolt.py`` joins several hosts into a
cable graph and a ring.

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

import json
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

from pydantic import ConfigDict, Field

from orchestrator.probe.macos import parse_hardware_ports, thunderbolt_devices
from orchestrator.schema import Model


class TBModel(Model):
    """Frozen, no unknown fields: the Thunderbolt models here and in ``thunderbolt.py``."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PeerMac(TBModel):
    """A Mac at the far end of a cable, as the near end sees it."""

    domain_uuid: str  # the far end's bus UUID
    name: Optional[str] = None  # marketing name, "Mac Studio"
    model: Optional[str] = None  # model id, "Mac15,14"


class TBPort(TBModel):
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


class TBHost(TBModel):
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
