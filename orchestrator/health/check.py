"""``orch check``: is this cluster ready for a run? Every host and every ring link, in parallel.

What is checked (each with a bound on its time; see ``probes.py`` for what runs on a host):

* **ssh**: reachable and authenticated (the launcher's own connector, so ssh_config,
  known_hosts, identities, user/port and ``--ssh-accept-new`` behave exactly as in
  ``orch run``), the host key status, the round trip over the channel.
* **python / mlx / mpi / metal**: the interpreter the run will use (``--python``, the
  hostfile's ``python``, else ``python3`` over SSH and this interpreter locally) starts;
  MLX imports, and its version is the same everywhere (hosts in the minority fail, every
  version is named); Open MPI where ``--backend mpi`` needs it; on macOS the Metal
  working-set limit.
* **disk / memory / clock**: free space under ``~/.cache/mlx-orch`` (warning under 2 GiB),
  memory, clock offset against this machine (half the round trip corrected; warning above 1 s).
* **links**: for every ring edge rank i -> rank i+1, a listener on rank i+1's host at the
  exact ``ip:port`` of the plan, and a connection to it *from rank i's host*: wrong-side
  addresses, downed links, ports in use, an address that is not the host's, and routes
  through the wrong interface are named per link.
* **collective** (``--collective``): a real all_sum across all ranks through ``orch run``'s
  own machinery (``orchestrator/runtime/probe_collective.py``): result checked, algorithm and
  bus bandwidth, small-message latency.

Exit status: 0 all pass (warnings allowed), 1 something failed, 2 a bad hostfile or option.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from typing import TYPE_CHECKING

from orchestrator.health import probes
from orchestrator.units import human_bytes

if TYPE_CHECKING:  # importing this module stays cheap (``orch --help`` builds its parser): pydantic loads on use
    from orchestrator.hostfile import Hostfile

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
DISK_WARN_BYTES = 2 << 30
SKEW_WARN_S = 1.0
STAGING_DIR = "~/.cache/mlx-orch"
REMOTE_PYTHON = "python3"
CLOCK_SAMPLES = 3
MARK = {"pass": "✓", "warn": "!", "fail": "✗", "skip": "–"}
CHECK_ORDER = ("ssh", "python", "mlx", "mpi", "metal", "disk", "memory", "clock", "ports")
PROBE_COLLECTIVE = Path(__file__).resolve().parent.parent / "runtime" / "probe_collective.py"


# ----------------------------------------------------------------------------- results


@dataclass
class Check:
    name: str
    status: str  # pass, warn, fail, skip (not checked because something before it failed)
    detail: str
    short: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "warn")

    def as_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "status": self.status, "detail": self.detail}


@dataclass
class HostResult:
    index: int
    host: str
    local: bool
    checks: dict[str, Check] = field(default_factory=dict)

    def add(self, name: str, status: str, detail: str, short: str = "") -> Check:
        c = self.checks[name] = Check(name, status, detail, short or detail)
        return c

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def as_json(self) -> dict:
        ordered = sorted(self.checks.values(), key=lambda c: CHECK_ORDER.index(c.name) if c.name in CHECK_ORDER else 99)
        return {"host": self.host, "index": self.index, "local": self.local, "ok": self.ok,
                "checks": [c.as_json() for c in ordered]}


@dataclass
class LinkResult:
    from_rank: int
    to_rank: int
    from_host: str
    to_host: str
    address: str
    status: str
    detail: str
    short: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "warn")

    def as_json(self) -> dict:
        return {"from": self.from_host, "to": self.to_host, "address": self.address, "ok": self.ok,
                "status": self.status, "detail": self.detail, "from_rank": self.from_rank, "to_rank": self.to_rank}


@dataclass
class Report:
    backend: str
    world_size: int
    hosts: list[HostResult]
    links: list[LinkResult] = field(default_factory=list)
    collective: Optional[dict] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (all(h.ok for h in self.hosts) and all(l.ok for l in self.links)
                and (self.collective is None or bool(self.collective.get("ok"))))

    def as_json(self) -> dict:
        return {"ok": self.ok, "backend": self.backend, "world_size": self.world_size,
                "hosts": [h.as_json() for h in self.hosts], "links": [l.as_json() for l in self.links],
                "collective": self.collective, "seconds": round(self.seconds, 3)}


@dataclass
class CheckOptions:
    hostfile: Optional[str] = None
    n: Optional[int] = None
    backend: Optional[str] = None
    python: Optional[str] = None
    collective: bool = False
    collective_mib: float = 64.0
    json_output: bool = False
    ssh_config: Optional[str] = None
    known_hosts: Optional[str] = None
    identity: list[str] = field(default_factory=list)
    ssh_accept_new: bool = False
    timeout: float = 15.0
    starting_port: Optional[int] = None
    mpirun: Optional[str] = None

    @property
    def connect_timeout(self) -> float:
        """How long one TCP connect on a link may take (a dropped SYN waits this long)."""
        return max(1.0, min(5.0, self.timeout / 3))


# ----------------------------------------------------------------------------- running a probe, locally or over SSH


class ProbeFailed(Exception):
    """A probe gave no report; the message says why in words."""


class _Proc:
    """One running probe: line-wise stdout, stdin, bounded waits, stderr kept for the diagnosis."""

    def __init__(self, python: str):
        self.python = python
        self.stderr_text = ""
        self._stderr_task: Optional[asyncio.Task] = None

    async def _drain_stderr(self, stream) -> None:
        try:
            while True:
                chunk = await stream.read(4096)
                if not chunk:
                    return
                if isinstance(chunk, bytes):
                    chunk = chunk.decode("utf-8", "replace")
                self.stderr_text = (self.stderr_text + chunk)[-4000:]
        except Exception:  # noqa: BLE001 - the stream went away with the process
            return

    async def readline(self) -> str:
        raise NotImplementedError

    def write(self, text: str) -> None:
        raise NotImplementedError

    def close_stdin(self) -> None:
        raise NotImplementedError

    async def wait(self, timeout: float) -> Optional[int]:
        """The exit code, or None when the probe did not end within ``timeout``."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    async def finish(self, timeout: float = 2.0) -> None:
        """stdin EOF (every probe ends on it), then a bounded wait, then kill."""
        self.close_stdin()
        if await self.wait(timeout) is None:
            self.kill()
            await self.wait(2.0)
        if self._stderr_task is not None:
            await asyncio.wait({self._stderr_task}, timeout=1.0)
            if not self._stderr_task.done():
                self._stderr_task.cancel()


class _LocalProc(_Proc):
    def __init__(self, python: str, proc: asyncio.subprocess.Process):
        super().__init__(python)
        self.proc = proc
        self._stderr_task = asyncio.ensure_future(self._drain_stderr(proc.stderr))

    async def readline(self) -> str:
        return (await self.proc.stdout.readline()).decode("utf-8", "replace")

    def write(self, text: str) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(text.encode())

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def wait(self, timeout: float) -> Optional[int]:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    def kill(self) -> None:
        if self.proc.returncode is not None:  # reaped: its pid may belong to someone else by now
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class _SSHProc(_Proc):
    def __init__(self, python: str, proc):
        super().__init__(python)
        self.proc = proc
        self._stderr_task = asyncio.ensure_future(self._drain_stderr(proc.stderr))

    async def readline(self) -> str:
        try:
            return await self.proc.stdout.readline()
        except Exception:  # noqa: BLE001 - connection lost: end of output
            return ""

    def write(self, text: str) -> None:
        try:
            if not self.proc.stdin.is_closing():
                self.proc.stdin.write(text)
        except Exception:  # noqa: BLE001
            pass

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.write_eof()
        except Exception:  # noqa: BLE001
            pass

    async def wait(self, timeout: float) -> Optional[int]:
        try:
            await asyncio.wait_for(self.proc.wait_closed(), timeout)
        except asyncio.TimeoutError:
            return None
        except Exception:  # noqa: BLE001
            return -1
        return self.proc.exit_status if self.proc.exit_status is not None else -1

    def kill(self) -> None:
        """Close the session: the probe sees stdin end and exits (sshd does not signal it)."""
        try:
            self.proc.close()
        except Exception:  # noqa: BLE001
            pass


class _Runner:
    """Starts probes on one host: a local subprocess, or an SSH session."""

    def __init__(self, name: str, python: str, env: dict[str, str], conn=None):
        self.name = name
        self.python = python
        self.env = env
        self.conn = conn
        self.procs: list[_Proc] = []

    @property
    def local(self) -> bool:
        return self.conn is None

    async def start(self, mode: str, config: dict) -> _Proc:
        argv = probes.probe_argv(self.python, mode, config)
        if self.local:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    env={**os.environ, **self.env}, start_new_session=True, limit=1 << 22)
            except FileNotFoundError:
                raise ProbeFailed(f"{self.python}: no such file") from None
            except PermissionError:
                raise ProbeFailed(f"{self.python}: not executable") from None
            except OSError as e:
                raise ProbeFailed(f"{self.python}: cannot start ({e.strerror or e})") from None
            p: _Proc = _LocalProc(self.python, proc)
        else:
            env = " ".join(shlex.quote(f"{k}={v}") for k, v in self.env.items())
            command = "exec " + (f"env {env} " if env else "") + " ".join(shlex.quote(a) for a in argv)
            try:
                proc = await self.conn.create_process(command, encoding="utf-8", errors="replace")
            except Exception as e:  # noqa: BLE001 - channel refused, connection lost
                raise ProbeFailed(f"cannot open an SSH session ({getattr(e, 'reason', None) or e})") from None
            p = _SSHProc(self.python, proc)
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            p.kill()


async def _report(proc: _Proc, timeout: float) -> dict:
    """Read until the probe's ``ORCHCHECK`` line (login shells may print first); ProbeFailed in words otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = await asyncio.wait_for(proc.readline(), max(0.01, left))
        except asyncio.TimeoutError:
            proc.kill()
            raise ProbeFailed(f"no answer within {timeout:g}s from {proc.python} (see --timeout)") from None
        if not line:
            rc = await proc.wait(2.0)
            raise ProbeFailed(describe_probe_exit(proc.python, rc, proc.stderr_text))
        rep = probes.parse_report(line)
        if rep is not None:
            return rep


def describe_probe_exit(python: str, rc: Optional[int], stderr: str) -> str:
    """Why a probe ended without a report (exit 127 from the login shell: the interpreter is missing)."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    last = lines[-1].strip() if lines else ""
    if rc == 127 or "command not found" in stderr or (rc is not None and "not found" in last and python in last):
        return f"{python}: not found on this host (set \"python\" in the hostfile or --python)"
    if rc == 126:
        return f"{python}: not executable"
    return f"{python} exited with code {rc}" + (f": {last}" if last else " without a report")


# ----------------------------------------------------------------------------- host checks


def host_checks(h: HostResult, rep: dict, samples: list[tuple[float, float, float]], *, backend: str,
                mpi_local: Optional[Any], mpi_error: Optional[str], mpi_prefix: Optional[str],
                python: Optional[str] = None) -> None:
    """Turn one host probe's report into checks (MLX version agreement is decided later, across hosts)."""
    exe = rep.get("python")
    h.add("python", "pass", (f"{python} -> " if python and python != exe else "") + f"{exe} (Python "
          f"{rep.get('python_version')}, {rep.get('system')} {rep.get('machine')})", f"{rep.get('python_version')}")
    mlx = rep.get("mlx") or {}
    if mlx.get("version"):
        h.add("mlx", "pass", f"mlx {mlx['version']}", mlx["version"])
    else:
        err = mlx.get("error") or "not importable"
        h.add("mlx", "fail", f"MLX is not importable with {rep.get('python')}: {err} "
              f"(pip install mlx into that interpreter, or point \"python\"/--python at one that has it)", "not importable")
    if rep.get("system") == "Darwin" and mlx.get("version"):
        metal = rep.get("metal") or {}
        try:
            from orchestrator.health.macos import parse_metal_device_info

            mem = parse_metal_device_info(metal)
            h.add("metal", "pass", f"Metal working set limit {human_bytes(mem.max_recommended_working_set_size)}"
                  f" of {human_bytes(mem.memory_size)}", human_bytes(mem.max_recommended_working_set_size))
        except (ValueError, SyntaxError) as e:
            h.add("metal", "warn", f"no Metal device info: {metal.get('error') or e}", "unknown")
    disk = rep.get("disk") or {}
    if "free" in disk:
        free = disk["free"]
        status = "warn" if free < DISK_WARN_BYTES else "pass"
        h.add("disk", status, f"{human_bytes(free)} free at {disk.get('path')} (staging dir {STAGING_DIR})"
              + ("; under 2 GiB: staging and checkpoints may not fit" if status == "warn" else ""),
              f"{human_bytes(free)} free")
    else:
        h.add("disk", "warn", f"free space unknown: {disk.get('error')}", "unknown")
    mem = rep.get("memory") or {}
    if mem.get("total"):
        h.add("memory", "pass", f"{human_bytes(mem.get('available'))} available of {human_bytes(mem['total'])}",
              f"{human_bytes(mem.get('available'))}/{human_bytes(mem['total'])}")
    else:
        h.add("memory", "warn", f"memory unknown: {mem.get('error') or 'not reported'}", "unknown")
    if backend == "mpi":
        mpi_check(h, rep.get("mpi") or {}, mpi_local, mpi_error, mpi_prefix)
    if h.local:
        h.add("clock", "pass", "this machine's clock", "local")
    else:
        est = probes.clock_offset(samples)
        if est is None:
            h.add("clock", "warn", "no clock sample", "unknown")
        else:
            off, rtt = est
            status = "warn" if abs(off) > SKEW_WARN_S else "pass"
            h.add("clock", status, f"offset {off:+.3f} s from this machine (±{rtt / 2 * 1000:.1f} ms)"
                  + ("; over 1 s: timestamps in logs and events will not line up" if status == "warn" else ""),
                  f"{off:+.3f}s")


def mpi_check(h: HostResult, rep: dict, mpi_local, mpi_error: Optional[str], mpi_prefix: Optional[str]) -> None:
    if mpi_error:
        h.add("mpi", "fail", f"mpirun runs on this machine and it has no usable Open MPI: {mpi_error}", "none here")
        return
    if h.local:
        h.add("mpi", "pass", f"{mpi_local.version} ({mpi_local.mpirun})", mpi_local.version.split()[-1] if mpi_local.version else "ok")
        return
    path, text = rep.get("path"), rep.get("version") or ""
    if not path:
        where = f"{mpi_prefix}/bin/mpirun, PATH" if mpi_prefix else "PATH"
        h.add("mpi", "fail", f"no Open MPI found (searched {where}); mpirun starts its daemons there with --prefix "
              f"{mpi_prefix or '?'}: install Open MPI at the same path as on this machine", "not found")
    elif "Open MPI" not in text and "OpenRTE" not in text:
        h.add("mpi", "fail", f"{path} is not Open MPI ({text.splitlines()[0] if text else 'no version'}); MLX loads Open MPI only",
              "not Open MPI")
    elif mpi_prefix and not path.startswith(mpi_prefix.rstrip("/") + "/"):
        h.add("mpi", "fail", f"Open MPI is at {path}, but mpirun passes --prefix {mpi_prefix} (this machine's); "
              "install it at the same path on every host", "other path")
    else:
        h.add("mpi", "pass", f"{text.splitlines()[0]} ({path})", text.splitlines()[0].split()[-1])


def mlx_agreement(hosts: list[HostResult], versions: dict[int, str]) -> None:
    """Every host must run the same MLX: the hosts in the minority fail, naming every version and where."""
    by_version: dict[str, list[str]] = {}
    for i, v in versions.items():
        names = by_version.setdefault(v, [])
        if hosts[i].host not in names:
            names.append(hosts[i].host)
    if len(by_version) < 2:
        return
    counts = sorted(((len({i for i, v2 in versions.items() if v2 == v}), v) for v in by_version), reverse=True)
    majority = counts[0][1] if counts[0][0] > counts[1][0] else None
    listing = "; ".join(f"{v} on {', '.join(names)}" for v, names in by_version.items())
    for i, v in versions.items():
        if majority is not None and v == majority:
            continue
        h = hosts[i]
        if majority is not None:
            detail = (f"mlx {v} here, but {majority} on {', '.join(by_version[majority])}: every host needs the same MLX "
                      f"(versions: {listing})")
        else:
            detail = f"MLX versions differ and no version has a majority: {listing}; install one version everywhere"
        h.add("mlx", "fail", detail, f"{v} ≠ {majority}" if majority else f"{v} (differs)")


# ----------------------------------------------------------------------------- links


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
    if plan.backend != "ring" or n < 2:
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


_ERRNO_WORDS = {
    "ENETUNREACH": "network unreachable", "EHOSTUNREACH": "no route to host", "ECONNREFUSED": "connection refused",
    "ETIMEDOUT": "timed out", "EADDRINUSE": "address already in use", "EADDRNOTAVAIL": "address not available",
}


def _errname(num: Optional[int], system: str) -> Optional[str]:
    """errno number -> symbolic name, for Linux and macOS numbering whatever this machine is."""
    linux = {101: "ENETUNREACH", 113: "EHOSTUNREACH", 111: "ECONNREFUSED", 110: "ETIMEDOUT", 98: "EADDRINUSE",
             99: "EADDRNOTAVAIL"}
    darwin = {51: "ENETUNREACH", 65: "EHOSTUNREACH", 61: "ECONNREFUSED", 60: "ETIMEDOUT", 48: "EADDRINUSE",
              49: "EADDRNOTAVAIL"}
    if num is None:
        return None
    return (darwin if system == "Darwin" else linux).get(num)


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
        err = _errname(bind.get("errno"), r_system)
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
        err = _errname(conn.get("errno"), s_system)
        words = _ERRNO_WORDS.get(err or "", conn.get("error") or "failed")
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


# ----------------------------------------------------------------------------- the check


def _python_for(opts: CheckOptions, host) -> str:
    if opts.python or host.python:
        return opts.python or host.python
    return sys.executable if host.is_local else REMOTE_PYTHON


def _load(opts: CheckOptions) -> Hostfile:
    from orchestrator.hostfile import ConfigError, load_hostfile, local_hostfile

    if opts.hostfile and opts.n is not None:
        raise ConfigError("give either -n N (local ranks) or --hostfile FILE, not both")
    if opts.hostfile:
        return load_hostfile(opts.hostfile)
    if opts.n is not None:
        return local_hostfile(opts.n)
    raise ConfigError("orch check needs --hostfile FILE (or -n N for this machine)")


async def run_check(opts: CheckOptions, err=None) -> Report:
    """Everything ``orch check`` does; ConfigError for a bad hostfile or option (nothing is contacted then)."""
    from orchestrator.hostfile import ConfigError
    from orchestrator.job import RunRequest
    from orchestrator.plan import plan_job

    err = err or sys.stderr
    t0 = time.monotonic()
    if opts.timeout <= 0:
        raise ConfigError(f"--timeout {opts.timeout:g}: must be positive")
    hostfile = _load(opts)
    backend = opts.backend or hostfile.backend or "ring"
    if backend not in ("ring", "mpi"):
        raise ConfigError(f"--backend {backend}: unknown backend; use ring or mpi")
    plan = plan_job(hostfile, backend, 1, opts.starting_port)
    hosts = [HostResult(i, h.name, h.is_local) for i, h in enumerate(hostfile.hosts)]
    names = [h.name for h in hostfile.hosts]
    report = Report(backend=backend, world_size=plan.world_size, hosts=hosts)

    mpi_local = mpi_error = mpi_prefix = None
    if backend == "mpi":
        from orchestrator.launch.mpi import find_mpi

        try:
            mpi_local = find_mpi(opts.mpirun)
            mpi_prefix = str(Path(mpi_local.libdir).parent) if mpi_local.libdir else None
        except ConfigError as e:
            mpi_error = str(e)

    req = RunRequest(script="orch-check", ssh_config=opts.ssh_config, known_hosts=opts.known_hosts,
                     identity=list(opts.identity), ssh_accept_new=opts.ssh_accept_new, connect_timeout=opts.timeout)
    remote = [i for i, h in enumerate(hostfile.hosts) if not h.is_local]
    conns: dict = {}
    runners: dict[int, _Runner] = {}
    try:
        if remote:
            from orchestrator.launch.ssh import connect_hosts

            conns = await connect_hosts(hostfile, req, remote, err=err)
        for i, h in enumerate(hostfile.hosts):
            env = {**hostfile.env, **h.env}
            if h.is_local:
                hosts[i].add("ssh", "pass", "this machine (no SSH)", "local")
                runners[i] = _Runner(h.name, _python_for(opts, h), env)
                continue
            hc = conns[i]
            if not hc.ok:
                hosts[i].add("ssh", "fail", f"cannot reach {h.name}: {hc.error}", _ssh_short(hc))
                continue
            runners[i] = _Runner(h.name, _python_for(opts, h), env, conn=hc.conn)
        reports = await _probe_hosts(hostfile, hosts, runners, conns, opts, backend, mpi_local, mpi_error, mpi_prefix)
        versions = {i: r["mlx"]["version"] for i, r in reports.items() if (r.get("mlx") or {}).get("version")}
        mlx_agreement(hosts, versions)
        edges = ring_edges(hostfile, plan)
        if edges:
            report.links = await _check_links(edges, names, hosts, runners, reports, opts)
    finally:
        for r in runners.values():
            r.kill_all()
        if conns:
            from orchestrator.launch.ssh import close_connections

            await close_connections(conns)
    if opts.collective:
        if not all(h.ok for h in hosts) or not all(l.ok for l in report.links):
            report.collective = {"ok": False, "detail": "not run: fix the failures above first (a broken ring only hangs)"}
        else:
            report.collective = await run_collective(opts, hostfile, backend, err)
    report.seconds = time.monotonic() - t0
    return report


def _ssh_short(hc) -> str:
    if hc.key_status == "changed":
        return "key CHANGED"
    if hc.key_status == "unknown":
        return "key unknown"
    e = hc.error or ""
    for needle, short in (("authentication", "auth failed"), ("refused", "refused"), ("no answer", "timeout"),
                          ("resolve", "unknown name"), ("no route", "no route")):
        if needle in e:
            return short
    return "unreachable"


async def _probe_hosts(hostfile, hosts, runners, conns, opts, backend, mpi_local, mpi_error, mpi_prefix) -> dict[int, dict]:
    config = {"staging": STAGING_DIR, "deadline": opts.timeout + 30, "mpi": backend == "mpi", "mpi_prefix": mpi_prefix}
    software = ["python", "mlx", "disk", "memory", "clock"] + (["mpi"] if backend == "mpi" else [])

    async def one(i: int) -> Optional[dict]:
        h = hosts[i]
        runner = runners.get(i)
        if runner is None:
            for name in software:
                h.add(name, "skip", "not checked: no SSH connection", "–")
            return None
        try:
            proc = await runner.start("host", config)
        except ProbeFailed as e:
            h.add("python", "fail", str(e), "cannot start")
            for name in software[1:]:
                h.add(name, "skip", f"not checked: {e}", "–")
            return None
        try:
            rep = await _report(proc, opts.timeout)
            samples = []
            if not h.local:
                for _ in range(CLOCK_SAMPLES):
                    sent = time.time()
                    proc.write("t\n")
                    try:
                        line = await asyncio.wait_for(proc.readline(), opts.timeout)
                    except asyncio.TimeoutError:
                        break
                    got = time.time()
                    if line.startswith("T "):
                        samples.append((sent, float(line.split()[1]), got))
        except ProbeFailed as e:
            h.add("python", "fail", str(e), "not found" if "not found" in str(e) else "failed")
            for name in software[1:]:
                h.add(name, "skip", "not checked: the python probe failed", "–")
            return None
        finally:
            await proc.finish()
        if not h.local:
            hc = conns[i]
            est = probes.clock_offset(samples)
            rtt = f", round trip {est[1] * 1000:.1f} ms" if est else ""
            key = {"known": "host key known", "accepted-new": "new host key accepted and recorded"}.get(hc.key_status, "")
            h.add("ssh", "pass", f"connected in {hc.connect_s * 1000:.0f} ms, {key}{rtt}",
                  f"{est[1] * 1000:.1f} ms" if est else "ok")
        host_checks(h, rep, samples, backend=backend, mpi_local=mpi_local, mpi_error=mpi_error, mpi_prefix=mpi_prefix,
                    python=runner.python)
        return rep

    results = await asyncio.gather(*(one(i) for i in range(len(hosts))))
    # An SSH row for connected hosts whose probe failed still says what SSH itself did.
    for i, h in enumerate(hosts):
        if "ssh" not in h.checks and i in conns and conns[i].ok:
            hc = conns[i]
            h.add("ssh", "pass", f"connected in {hc.connect_s * 1000:.0f} ms, host key {hc.key_status}", "ok")
    return {i: r for i, r in enumerate(results) if r is not None}


async def _check_links(edges: list[Edge], names, hosts, runners, reports, opts) -> list[LinkResult]:
    systems = {i: (reports.get(i) or {}).get("system") or (platform.system() if hosts[i].local else "Linux")
               for i in range(len(hosts))}
    # Link probes need only the standard library: where the run's python failed, try the default one.
    runners = dict(runners)
    for i, r in list(runners.items()):
        if i not in reports:
            fallback = sys.executable if r.local else REMOTE_PYTHON
            if fallback != r.python:
                runners[i] = _Runner(r.name, fallback, r.env, conn=r.conn)
            else:
                del runners[i]
    usable = set(runners)
    nonces = {i: secrets.token_hex(8) for i in range(len(hosts))}
    listen_deadline = 3 * opts.timeout + 10
    binds: dict[str, dict] = {}
    listen_ifaces: dict[int, Any] = {}
    listen_fail: dict[int, str] = {}
    listeners: dict[int, _Proc] = {}

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
            rep = await _report(proc, opts.timeout)
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
                    rep = await _report(proc, opts.connect_timeout + opts.timeout)
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
            words = "; ".join(f"{e.address}: {_ERRNO_WORDS.get(_errname(b.get('errno'), systems[i]) or '', b.get('error'))}"
                              + (f" (held by: {' '.join((b.get('holder') or '').split())[:160]})" if b.get("holder") else "")
                              for e, b in bad)
            short = "in use" if any(_errname(b.get("errno"), systems[i]) == "EADDRINUSE" for _, b in bad) else "cannot bind"
            hosts[i].add("ports", "fail", f"rank listen address(es) unusable on {names[i]}: {words}", short)
        elif mine:
            hosts[i].add("ports", "pass", "free: " + ", ".join(e.address for e in mine), "free")
    return out


# ----------------------------------------------------------------------------- the collective


async def run_collective(opts: CheckOptions, hostfile: Hostfile, backend: str, err) -> dict:
    """A real all_sum over every rank, started exactly like ``orch run`` starts a job."""
    from orchestrator.hostfile import ConfigError
    from orchestrator.job import RunRequest, run_job_async

    tmp = Path(tempfile.mkdtemp(prefix="orch-check-"))
    run_dir = tmp / "run"
    budget = max(60.0, 4 * opts.timeout)
    req = RunRequest(
        script=str(PROBE_COLLECTIVE), script_args=["--size-mib", f"{opts.collective_mib:g}"],
        hostfile=opts.hostfile, n=opts.n if not opts.hostfile else None, backend=backend, python=opts.python,
        run_dir=str(run_dir), init_timeout=max(opts.timeout, 10.0), first_step_timeout=budget, hang_timeout=budget,
        starting_port=opts.starting_port, echo=False, json_output=True,
        ssh_config=opts.ssh_config, known_hosts=opts.known_hosts, identity=list(opts.identity),
        ssh_accept_new=opts.ssh_accept_new, connect_timeout=opts.timeout, mpirun=opts.mpirun)
    try:
        summary = await asyncio.wait_for(run_job_async(req), budget + 60)
    except asyncio.TimeoutError:
        return {"ok": False, "detail": f"the all_sum run did not finish within {budget + 60:g}s; logs in {run_dir}",
                "run_dir": str(run_dir)}
    except ConfigError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"ok": False, "detail": f"could not start the all_sum run: {e}"}
    m = summary.metrics or {}
    if summary.status != "succeeded" or not m.get("allsum_correct"):
        why = summary.diagnosis or summary.reason or ("wrong all_sum result" if m else "no result reported")
        return {"ok": False, "detail": f"all_sum across {summary.world_size} ranks failed: {why}; logs in {run_dir}",
                "run_dir": str(run_dir), "metrics": m}
    detail = (f"{human_bytes(m['allsum_bytes'])} all_sum over {m['world_size']} ranks: result correct; "
              f"{m['algbw_GBps']:.3g} GB/s algorithm bandwidth ({m['busbw_GBps']:.3g} GB/s bus), "
              f"median {m['allsum_s'] * 1000:.1f} ms; 8-byte all_sum latency median {m['latency_us']:.0f} µs "
              f"(of {m['latency_iters']})")
    note = expected_speed_note(hostfile, m.get("busbw_GBps"))
    return {"ok": True, "detail": detail + (f"; {note}" if note else ""), **{k: m[k] for k in (
        "world_size", "allsum_bytes", "allsum_s", "algbw_GBps", "busbw_GBps", "latency_us", "latency_iters")},
        "expected": note, "run_dir": str(run_dir)}


def expected_speed_note(hostfile: Hostfile, busbw_gbps: Optional[float]) -> Optional[str]:
    """Thunderbolt cables (hostfile ``links``) carry 40 Gb/s (TB3/4) or 80 Gb/s (TB5); a note, never a failure."""
    if not any(h.links for h in hostfile.hosts) or busbw_gbps is None:
        return None
    pct = busbw_gbps * 8 / 40 * 100
    return (f"the hostfile's links are Thunderbolt cables: 40 Gb/s (TB3/TB4, 5 GB/s) or 80 Gb/s (TB5, 10 GB/s) each; "
            f"bus bandwidth is {pct:.0f}% of 40 Gb/s (IP over Thunderbolt usually reaches a fraction of the line rate)")


# ----------------------------------------------------------------------------- output


def render(report: Report) -> str:
    """Host x check table (✓ pass, ! warning, ✗ fail, – not checked), one row per link, then every problem in full."""
    names = [n for n in CHECK_ORDER if any(n in h.checks for h in report.hosts)]
    rows = [["host"] + names]
    for h in report.hosts:
        row = [h.host]
        for n in names:
            c = h.checks.get(n)
            row.append("" if c is None else MARK[c.status] if c.status == "skip" else f"{MARK[c.status]} {c.short}".strip())
        rows.append(row)
    widths = [min(28, max(len(r[k]) for r in rows)) for k in range(len(rows[0]))]
    lines = [f"orch check: {len(report.hosts)} host{'s' if len(report.hosts) != 1 else ''}, {report.world_size} "
             f"rank{'s' if report.world_size != 1 else ''}, {report.backend} backend", ""]
    for r in rows:
        lines.append("  ".join(cell[:28].ljust(w) for cell, w in zip(r, widths)).rstrip())
    if report.links:
        lines += ["", "ring links (rank i -> rank i+1, tested from rank i's host to the address rank i+1 will listen on)"]
        for l in report.links:
            lines.append(f"{MARK[l.status]} rank {l.from_rank} {l.from_host} -> rank {l.to_rank} {l.to_host}  {l.address}  "
                         f"{l.short}")
    if report.collective is not None:
        c = report.collective
        lines += ["", f"{MARK['pass' if c.get('ok') else 'fail']} collective: {c.get('detail')}"]
    problems = [(h.host, c) for h in report.hosts for c in h.checks.values() if c.status in ("fail", "warn")]
    failed_links = [l for l in report.links if not l.ok]
    if problems or failed_links:
        lines += ["", "problems:"]
        for host, c in problems:
            lines.append(f"  {MARK[c.status]} {host} {c.name}: {c.detail}")
        for l in failed_links:
            lines.append(f"  {MARK[l.status]} link rank {l.from_rank} {l.from_host} -> rank {l.to_rank} {l.to_host} "
                         f"({l.address}): {l.detail}")
    n_fail = sum(1 for h in report.hosts for c in h.checks.values() if c.status == "fail") + len(failed_links) + (
        0 if report.collective is None or report.collective.get("ok") else 1)
    lines += ["", f"orch check: {'all checks passed' if report.ok else f'FAILED ({n_fail} failing)'} "
                  f"in {report.seconds:.1f}s"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def add_check_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="JSON hostfile (the one orch run will use)")
    where.add_argument("-n", "--nproc", dest="n", type=int, help="check N local ranks (no hostfile)")
    p.add_argument("--backend", choices=["ring", "mpi"], help="backend to check for (default: hostfile's, else ring)")
    p.add_argument("--python", help="python interpreter the ranks will use (default: the hostfile's, python3 remotely)")
    p.add_argument("--collective", action="store_true", help="also run a real all_sum over all ranks: result, bandwidth, latency")
    p.add_argument("--collective-mib", type=float, default=64.0, help="size of the bandwidth all_sum in MiB (default 64)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds each check may take (default 15)")
    p.add_argument("--starting-port", type=int, help="first ring port, as orch run will get it (default: a free random range)")
    p.add_argument("--mpirun", help="the Open MPI mpirun orch run will use (--backend mpi)")
    ssh = p.add_argument_group("remote hosts (SSH)")
    ssh.add_argument("--ssh-config", help="OpenSSH client config to honour (default ~/.ssh/config)")
    ssh.add_argument("--known-hosts", help="known_hosts file to verify host keys against (default ~/.ssh/known_hosts)")
    ssh.add_argument("-i", "--identity", action="append", default=[], help="private key file (repeatable)")
    ssh.add_argument("--ssh-accept-new", action="store_true", help="trust unknown host keys on first use and record them")
    return p


def options_from_args(args: argparse.Namespace) -> CheckOptions:
    return CheckOptions(
        hostfile=args.hostfile, n=args.n, backend=args.backend, python=args.python, collective=args.collective,
        collective_mib=args.collective_mib, json_output=args.json, ssh_config=args.ssh_config,
        known_hosts=args.known_hosts, identity=list(args.identity or []), ssh_accept_new=args.ssh_accept_new,
        timeout=args.timeout, starting_port=args.starting_port, mpirun=args.mpirun)


def cmd_check(args: argparse.Namespace) -> int:
    """``orch check``: 0 all pass, 1 a check failed, 2 a bad hostfile or option (one line on stderr)."""
    from orchestrator.hostfile import ConfigError

    opts = options_from_args(args)
    try:
        if opts.collective_mib <= 0:
            raise ConfigError(f"--collective-mib {opts.collective_mib:g}: must be positive")
        report = asyncio.run(run_check(opts))
    except ConfigError as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    if opts.json_output:
        sys.stdout.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        sys.stdout.write(render(report))
    sys.stdout.flush()
    return EXIT_OK if report.ok else EXIT_FAIL


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orch check", description="Check that every host and ring link is ready for orch run.")
    add_check_arguments(parser)
    return cmd_check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
