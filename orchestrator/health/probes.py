"""What ``orch check`` runs on each host, and how its answers are read.

One small program, standard library only (``PROBE_SOURCE``), runs on every host with
the Python the run will use: ``PYTHON -c PROBE_SOURCE MODE CONFIG_JSON``, through a
local subprocess or an SSH session. It writes one line ``ORCHCHECK {json}`` and, in some
modes, keeps answering on stdin until that closes. Three modes:

* ``host``: the interpreter, MLX (importable? version; on macOS the Metal device
  info), free disk under the staging directory, memory, optionally Open MPI; then a
  clock loop: every line read from stdin is answered with ``T <time.time()>``, so the
  controller can measure the clock offset and the round trip over the same channel.
* ``listen``: bind and listen at the exact ``ip:port`` a rank will listen on (reporting
  bind errors: port in use, and by whom; an address that is not this host's), then
  answer each connection's token with a nonce, until stdin closes or the deadline.
* ``connect``: for each target, the route the kernel picks (``ip -j route get`` on
  Linux, ``route -n get`` on macOS), a TCP connect with a timeout, the source address
  it used, and the listener's nonce.

Each mode also reports the host's interfaces (``ip -j addr show`` / ``ifconfig``) raw;
everything is parsed here, on the controller, where it can be tested against recorded
output. Every wait in the probe is bounded: a deadline from the config, and stdin EOF.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from orchestrator.health.macos import parse_ifconfig

MARKER = "ORCHCHECK "

PROBE_SOURCE = r'''
import errno, json, os, platform, select, shutil, socket, subprocess, sys, threading, time
MODE = sys.argv[1]
CFG = json.loads(sys.argv[2])
END = time.monotonic() + float(CFG.get("deadline", 60))
DARWIN = sys.platform == "darwin"
PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"

def out(obj):
    sys.stdout.write("ORCHCHECK " + json.dumps(obj) + "\n")
    sys.stdout.flush()

def run(argv, timeout=5.0):
    exe = shutil.which(argv[0], path=PATH)
    if exe is None:
        return {"rc": None, "out": "", "err": argv[0] + ": not found"}
    try:
        p = subprocess.run([exe] + argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
        return {"rc": p.returncode, "out": p.stdout[-60000:], "err": p.stderr[-2000:]}
    except Exception as e:
        return {"rc": None, "out": "", "err": "%s: %s" % (type(e).__name__, e)}

def ifaces():
    return run(["ifconfig"] if DARWIN else ["ip", "-j", "addr", "show"])

def stdin_lines():
    buf = b""
    while True:
        left = END - time.monotonic()
        if left <= 0:
            return
        r = select.select([0], [], [], left)[0]
        if not r:
            return
        data = os.read(0, 4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode("utf-8", "replace")

def memory():
    m = {}
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("MemTotal", "MemAvailable"):
                    m[k] = int(v.split()[0]) * 1024
        return {"total": m.get("MemTotal"), "available": m.get("MemAvailable")}
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    avail = None
    vm = run(["vm_stat"])
    if vm["rc"] == 0:
        page, pages = 4096, {}
        for line in vm["out"].splitlines():
            if "page size of" in line:
                page = int(line.split("page size of")[1].split()[0])
            k, _, v = line.partition(":")
            v = v.strip().rstrip(".")
            if v.isdigit():
                pages[k.strip()] = int(v)
        avail = page * sum(pages.get(k, 0) for k in ("Pages free", "Pages inactive", "Pages speculative"))
    return {"total": total, "available": avail}

def disk(path):
    p = os.path.expanduser(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    st = os.statvfs(p)
    return {"path": p, "free": st.f_bavail * st.f_frsize, "total": st.f_blocks * st.f_frsize}

def mpi(prefix):
    cands = []
    if prefix:
        cands.append(os.path.join(prefix, "bin", "mpirun"))
    found = shutil.which("mpirun", path=PATH)
    if found and found not in cands:
        cands.append(found)
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            r = run([c, "--version"], timeout=10.0)
            return {"path": c, "version": (r["out"] + r["err"]).strip()[:2000], "searched": cands}
    return {"path": None, "searched": cands}

def host():
    r = {"python": sys.executable, "python_version": platform.python_version(), "system": platform.system(),
         "machine": platform.machine(), "hostname": socket.gethostname()}
    try:
        import mlx.core as mx
        r["mlx"] = {"version": getattr(mx, "__version__", None), "file": getattr(mx, "__file__", None)}
        if DARWIN:
            try:
                info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
                r["metal"] = dict((k, v) for k, v in info.items() if isinstance(v, (int, float, str, bool)))
            except Exception as e:
                r["metal"] = {"error": "%s: %s" % (type(e).__name__, e)}
    except BaseException as e:
        r["mlx"] = {"error": "%s: %s" % (type(e).__name__, e)}
    try:
        r["disk"] = disk(CFG.get("staging", "~/.cache/mlx-orch"))
    except OSError as e:
        r["disk"] = {"error": str(e)}
    try:
        r["memory"] = memory()
    except Exception as e:
        r["memory"] = {"error": str(e)}
    if CFG.get("mpi"):
        r["mpi"] = mpi(CFG.get("mpi_prefix"))
    r["time"] = time.time()
    out(r)
    for _ in stdin_lines():
        sys.stdout.write("T %.6f\n" % time.time())
        sys.stdout.flush()

def holder(port):
    if DARWIN:
        r = run(["lsof", "-nP", "-iTCP:%d" % port, "-sTCP:LISTEN"], timeout=3.0)
    else:
        r = run(["ss", "-Htlnp", "sport = :%d" % port], timeout=3.0)
    return r["out"].strip()[:500] if r["rc"] == 0 else None

def listen():
    socks, bound = {}, []
    for t in CFG["targets"]:
        res = {"id": t["id"]}
        s = socket.socket(socket.AF_INET6 if ":" in t["ip"] else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((t["ip"], t["port"]))
            s.listen(16)
            socks[s] = t
            res["bound"] = True
        except OSError as e:
            s.close()
            res.update(bound=False, errno=e.errno, error=e.strerror or str(e))
            if e.errno == errno.EADDRINUSE:
                res["holder"] = holder(t["port"])
        bound.append(res)
    out({"bound": bound, "ifaces": ifaces()})
    while socks and time.monotonic() < END:
        r = select.select(list(socks) + [0], [], [], max(0.0, END - time.monotonic()))[0]
        if 0 in r and not os.read(0, 4096):
            break
        for s in r:
            if s == 0:
                continue
            c, addr = s.accept()
            c.settimeout(2.0)
            try:
                tok = c.makefile("r").readline().strip()
                c.sendall((CFG["nonce"] + "\n").encode())
                out({"accepted": addr[0], "id": socks[s]["id"], "token": tok})
                c.recv(1)  # the client closes first: TIME_WAIT stays on its side, the port is free for the ranks
            except OSError:
                pass
            finally:
                c.close()
    for s in socks:
        s.close()

def connect_one(t, res):
    ip = t["ip"]
    res["route"] = run(["route", "-n", "get", ip]) if DARWIN else run(["ip", "-j", "route", "get", ip])
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(float(CFG.get("connect_timeout", 3)))
    t0 = time.monotonic()
    try:
        s.connect((ip, t["port"]))
        res["connected"] = True
        res["connect_ms"] = round((time.monotonic() - t0) * 1000, 3)
        res["src"] = s.getsockname()[0]
        s.sendall((t["token"] + "\n").encode())
        res["reply"] = s.makefile("r").readline().strip()
    except socket.timeout:
        res.update(connected=res.get("connected", False), errno=errno.ETIMEDOUT, error="timed out")
    except OSError as e:
        res.update(connected=res.get("connected", False), errno=e.errno, error=e.strerror or str(e))
    finally:
        s.close()

def connect():
    results = [{"id": t["id"]} for t in CFG["targets"]]
    threads = [threading.Thread(target=connect_one, args=(t, r), daemon=True) for t, r in zip(CFG["targets"], results)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.0, END - time.monotonic()))
    out({"results": results, "ifaces": ifaces()})

{"host": host, "listen": listen, "connect": connect}[MODE]()
'''


def probe_argv(python: str, mode: str, config: dict) -> list[str]:
    """The command line of one probe (the program travels on it: nothing is staged)."""
    return [python, "-c", PROBE_SOURCE, mode, json.dumps(config, separators=(",", ":"))]


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
    """macOS ``ifconfig`` -> interfaces (via ``orchestrator.health.macos.parse_ifconfig``)."""
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
