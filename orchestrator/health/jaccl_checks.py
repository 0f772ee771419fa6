"""What JACCL (RDMA over Thunderbolt 5) needs from each Mac, read from the host probe's raw outputs.

``orch check --backend jaccl|jaccl-ring`` (or a hostfile whose backend is jaccl*) and
``orch env`` both read the same facts (``read_macos``): the macOS version and build, ``rdma_ctl
status``, ``ibv_devices``, ``system_profiler SPThunderboltDataType -json`` with ``networksetup
-listallhardwareports`` (which port is which ``enX``, the cable's speed, the Mac at the far
end) and ``ifconfig`` (which ports the Thunderbolt Bridge holds).

Every parser here was written against real recorded output (``tests/fixtures/macos/``,
provenance in its ``SOURCES.md``) and is strict: output of any other shape is reported as
"could not read ... output" with the text itself, never guessed at. Where no recording
exists (``rdma_ctl status`` printing anything but ``enabled``, a 40 Gb/s Mac-to-Mac link),
the fixture README says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator.health.verdicts import HostResult

MIN_MACOS = (26, 2)
TB5_GBPS = 80
RDMA_ENABLE = "enable RDMA with `rdma_ctl enable` from macOS Recovery, then reboot"


class Unreadable(ValueError):
    """Output of a shape no recording shows; the message quotes it."""


def _quote(text: str, limit: int = 120) -> str:
    text = " ".join((text or "").split())
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


# ----------------------------------------------------------------------------- parsers

_IBV_HEADER = re.compile(r"^\s*device\s+node GUID\s*$")
_IBV_RULE = re.compile(r"^\s*-+\s+-+\s*$")
_IBV_ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s*$")


def parse_ibv_devices(text: str) -> list[str]:
    """``ibv_devices`` -> device names (``rdma_en2``, ...), in the order printed.

    The recorded shape: a ``device  node GUID`` header, a rule of dashes, then one
    ``<device> <guid>`` row per device (none at all when RDMA is enabled on a Mac without
    Thunderbolt 5). Indentation and tabs vary between recordings, so whitespace is free.
    """
    lines = [l for l in (text or "").splitlines() if l.strip()]
    if len(lines) < 2 or not _IBV_HEADER.match(lines[0]) or not _IBV_RULE.match(lines[1]):
        raise Unreadable(f"could not read ibv_devices output: {_quote(text)}")
    out = []
    for line in lines[2:]:
        m = _IBV_ROW.match(line)
        if m is None:
            raise Unreadable(f"could not read ibv_devices output (line {_quote(line)})")
        out.append(m.group(1))
    return out


def parse_rdma_ctl_status(text: str) -> bool:
    """``rdma_ctl status`` -> True for the one recorded answer, ``enabled``; anything else is unreadable
    (no recording of what a Mac with RDMA off prints exists, so none is assumed)."""
    if (text or "").strip() == "enabled":
        return True
    raise Unreadable(f"could not read rdma_ctl status output: {_quote(text)} (it prints 'enabled' when RDMA is on)")


_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
_BUILD = re.compile(r"^\d+[A-Z]\d+[a-z]?$")


def parse_macos_version(info: Optional[dict]) -> tuple[tuple[int, ...], str, str]:
    """The probe's ``macos.version`` (ProductVersion / ProductBuildVersion of SystemVersion.plist)
    -> ((26, 2), "26.2", "25C56")."""
    info = info or {}
    version, build = str(info.get("version") or ""), str(info.get("build") or "")
    m = _VERSION.match(version)
    if info.get("error") or m is None or not _BUILD.match(build):
        raise Unreadable(f"could not read the macOS version: {info.get('error') or _quote(f'{version} {build}')}")
    return tuple(int(g) for g in m.groups() if g is not None), version, build


_SPEED = re.compile(r"^(\d+) Gb/s$")


def link_gbps(speed: Optional[str]) -> int:
    """A cabled port's ``current_speed_key`` (recorded: ``80 Gb/s``) -> 80."""
    m = _SPEED.match((speed or "").strip())
    if m is None:
        raise Unreadable(f"could not read the Thunderbolt link speed {_quote(speed or '')}")
    return int(m.group(1))


def tb_generation(gbps: int) -> str:
    return "Thunderbolt 5" if gbps >= TB5_GBPS else "Thunderbolt 4 or older"


# ----------------------------------------------------------------------------- one host's facts


@dataclass
class TBLink:
    iface: Optional[str]
    receptacle: Optional[str]
    speed: Optional[str]
    peer: Optional[str]        # the Mac at the far end ("Mac Studio (Mac15,14)"), None when nothing is cabled
    gbps: Optional[int] = None
    error: Optional[str] = None

    def as_json(self) -> dict:
        return {"iface": self.iface, "receptacle": self.receptacle, "speed": self.speed, "gbps": self.gbps,
                "generation": tb_generation(self.gbps) if self.gbps else None, "peer": self.peer, "error": self.error}


@dataclass
class MacFacts:
    """What a Mac's raw outputs say; each part holds a value or the reason it could not be read."""

    version: Optional[tuple[int, ...]] = None
    version_text: Optional[str] = None
    build: Optional[str] = None
    rdma_enabled: Optional[bool] = None
    ibv_devices: Optional[list[str]] = None
    links: Optional[list[TBLink]] = None
    bridge: Optional[str] = None          # the Thunderbolt Bridge's device (bridge0), None when there is none
    bridge_members: Optional[list[str]] = None
    errors: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"macos": self.version_text, "build": self.build, "rdma_ctl": (
                    "enabled" if self.rdma_enabled else None), "ibv_devices": self.ibv_devices,
                "thunderbolt": [l.as_json() for l in self.links] if self.links is not None else None,
                "bridge": self.bridge, "bridge_members": self.bridge_members, "errors": self.errors}


def _command(raw: Optional[dict], what: str) -> str:
    """A command result's stdout, or Unreadable saying why there is none."""
    if not raw:
        raise Unreadable(f"{what}: not run (the probe ran out of time)")
    if raw.get("rc") is None:
        raise Unreadable(f"{what}: {raw.get('err') or 'did not run'}")
    if raw.get("rc") != 0:
        words = (raw.get("err") or raw.get("out") or "").strip().splitlines()
        raise Unreadable(f"{what} exited with code {raw['rc']}" + (f": {words[-1]}" if words else ""))
    return raw.get("out") or ""


def read_macos(raw: dict) -> MacFacts:
    """The probe's ``macos`` field -> MacFacts (never raises: unreadable parts land in ``errors``)."""
    from orchestrator.probe.macos import parse_ifconfig
    from orchestrator.health.thunderbolt import TopologyError
    from orchestrator.health.thunderbolt_host import parse_host

    f = MacFacts()
    try:
        f.version, f.version_text, f.build = parse_macos_version(raw.get("version"))
    except Unreadable as e:
        f.errors["macos"] = str(e)
    try:
        f.rdma_enabled = parse_rdma_ctl_status(_command(raw.get("rdma_ctl"), "rdma_ctl status"))
    except Unreadable as e:
        f.errors["rdma_ctl"] = str(e)
    try:
        f.ibv_devices = parse_ibv_devices(_command(raw.get("ibv_devices"), "ibv_devices"))
    except Unreadable as e:
        f.errors["ibv_devices"] = str(e)
    try:
        sp = _command(raw.get("sp_thunderbolt"), "system_profiler SPThunderboltDataType -json")
        ns = _command(raw.get("networksetup"), "networksetup -listallhardwareports")
        try:
            host = parse_host(sp, ns)
        except (ValueError, TopologyError, TypeError, AttributeError) as e:
            raise Unreadable(f"could not read system_profiler SPThunderboltDataType output ({type(e).__name__})") from None
        f.bridge = host.bridge
        f.links = []
        for p in host.ports:
            peer = None if p.peer is None else " ".join(x for x in (p.peer.name, f"({p.peer.model})" if p.peer.model else "") if x)
            link = TBLink(iface=p.iface, receptacle=p.receptacle, speed=p.speed, peer=peer)
            if p.peer is not None:
                try:
                    link.gbps = link_gbps(p.speed)
                except Unreadable as e:
                    link.error = str(e)
            f.links.append(link)
    except Unreadable as e:
        f.errors["thunderbolt"] = str(e)
    if f.bridge:
        try:
            ifs = parse_ifconfig(_command(raw.get("ifconfig"), "ifconfig"))
            f.bridge_members = list(ifs[f.bridge].members) if f.bridge in ifs else []
        except Unreadable as e:
            f.errors["bridge"] = str(e)
    return f


# ----------------------------------------------------------------------------- the checks


def device_names(row: list[Any]) -> list[str]:
    """The RDMA devices one hostfile ``rdma`` row names (entries are null, a name, or a list of names)."""
    out: list[str] = []
    for dev in row:
        for d in dev if isinstance(dev, list) else [dev]:
            if d and d not in out:
                out.append(d)
    return out


def iface_of(device: str) -> Optional[str]:
    """``rdma_en3`` -> ``en3`` (MLX names each Thunderbolt RDMA device after its network interface)."""
    return device[len("rdma_"):] if device.startswith("rdma_") else None


def jaccl_host_checks(h: HostResult, rep: dict, devices: list[str]) -> Optional[MacFacts]:
    """macos / rdma / thunderbolt / bridge rows of one host for the devices its hostfile row names."""
    if rep.get("system") != "Darwin":
        why = f"JACCL runs on macOS {'.'.join(map(str, MIN_MACOS))}+ only; this host runs {rep.get('system')}"
        h.add("macos", "fail", why, rep.get("system") or "?")
        for name in ("rdma", "thunderbolt", "bridge"):
            h.add(name, "skip", "not checked: not macOS", "–")
        return None
    f = read_macos(rep.get("macos") or {})
    need = ".".join(map(str, MIN_MACOS))
    if "macos" in f.errors:
        h.add("macos", "fail", f.errors["macos"], "unknown")
    elif f.version < MIN_MACOS:
        h.add("macos", "fail", f"macOS {f.version_text} ({f.build}): RDMA over Thunderbolt needs macOS {need} or later",
              f"{f.version_text} < {need}")
    else:
        h.add("macos", "pass", f"macOS {f.version_text} ({f.build})", f"{f.version_text} {f.build}")

    problems = []
    if f.rdma_enabled is not True:
        problems.append(f"{f.errors.get('rdma_ctl')}; {RDMA_ENABLE}")
    if f.ibv_devices is None:
        problems.append(f.errors["ibv_devices"])
    else:
        missing = [d for d in devices if d not in f.ibv_devices]
        if missing:
            have = ", ".join(f.ibv_devices) or "none"
            problems.append(f"ibv_devices does not list {', '.join(missing)} (it lists: {have})"
                            + ("; with RDMA enabled and no device, the Mac or its ports lack Thunderbolt 5"
                               if not f.ibv_devices and f.rdma_enabled else "; is the cable on that port?"))
    if problems:
        h.add("rdma", "fail", "; ".join(problems), "disabled" if f.rdma_enabled is not True else "missing device")
    else:
        h.add("rdma", "pass", f"RDMA enabled; {', '.join(devices) or 'no devices named'} present", "enabled")

    if f.links is None:
        h.add("thunderbolt", "fail", f.errors["thunderbolt"], "unknown")
    else:
        by_iface = {l.iface: l for l in f.links if l.iface}
        bad, good = [], []
        for d in devices:
            link = by_iface.get(iface_of(d) or "")
            if link is None:
                bad.append(f"{d}: no Thunderbolt port is {iface_of(d) or d} (networksetup -listallhardwareports)")
            elif link.peer is None:
                bad.append(f"{d}: nothing is cabled to Thunderbolt {link.receptacle} ({link.iface})")
            elif link.error:
                bad.append(f"{d}: {link.error}")
            elif link.gbps < TB5_GBPS:
                bad.append(f"{d}: {link.speed} to {link.peer} ({tb_generation(link.gbps)}): JACCL needs a Thunderbolt 5 "
                           "link (TB5 Macs at both ends and a TB5 cable)")
            else:
                good.append(f"{d} {link.speed} to {link.peer}")
        if bad:
            h.add("thunderbolt", "fail", "; ".join(bad), "slow link" if all("JACCL needs" in b for b in bad) else "no link")
        else:
            speeds = sorted({by_iface[iface_of(d)].speed for d in devices})
            h.add("thunderbolt", "pass", "; ".join(good) or "no devices named", ", ".join(speeds) or "ok")

    if "bridge" in f.errors:
        h.add("bridge", "fail", f.errors["bridge"], "unknown")
    else:
        held = [iface_of(d) for d in devices if iface_of(d) in (f.bridge_members or [])]
        if held:
            h.add("bridge", "fail", f"the Thunderbolt Bridge ({f.bridge}) holds {', '.join(held)}: JACCL needs those ports "
                  f"to itself; remove them from the bridge (System Settings > Network > Thunderbolt Bridge, or "
                  f"`sudo ifconfig {f.bridge} deletem <port>` for each)", "holds ports")
        else:
            h.add("bridge", "pass", f"{f.bridge or 'no Thunderbolt Bridge'} holds none of the RDMA ports", "free")
    return f


def build_agreement(hosts: list[HostResult], builds: dict[int, str]) -> None:
    """Every host must run the same macOS build (RDMA over Thunderbolt changes between builds)."""
    if len(set(builds.values())) < 2:
        return
    counts: dict[str, int] = {}
    for b in builds.values():
        counts[b] = counts.get(b, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    majority = ranked[0][0] if ranked[0][1] > ranked[1][1] else None
    listing = "; ".join(f"{b} on {', '.join(hosts[i].host for i in builds if builds[i] == b)}" for b in counts)
    for i, b in builds.items():
        if b == majority:
            continue
        hosts[i].add("macos", "fail", f"macOS build {b} here, but the hosts differ ({listing}): JACCL needs the same "
                     "macOS build on every host; update them to one build", f"{b} (differs)")
