"""The program ``orch check`` and ``orch env`` run on every host (standard library only).

It is shipped as source: ``PYTHON -c <this file> MODE CONFIG_JSON`` through a local
subprocess or an SSH session (``probes.probe_argv``), so nothing is staged on the host and
the interpreter under test is exactly the one the run will use. It must therefore import
nothing outside the standard library, and run on any Python 3 a host may have.

It writes one line ``ORCHCHECK {json}`` and, in some modes, keeps answering on stdin until
that closes. Modes:

* ``host``: the interpreter, MLX (importable? version; on macOS the Metal device info),
  free disk under the staging directory, memory, optionally Open MPI, optionally (config
  ``macos``) the raw macOS facts JACCL depends on; then a clock loop: every line read from
  stdin is answered with ``T <time.time()>``, so the controller can measure the clock
  offset and the round trip over the same channel.
* ``listen``: bind and listen at the exact ``ip:port`` a rank will listen on (reporting
  bind errors: port in use, and by whom; an address that is not this host's), then answer
  each connection's token with a nonce, until stdin closes or the deadline.
* ``linkbw``: the bandwidth of each link (``orch run/hostfile --ring-order measured``): listen on the
  given addresses, count what arrives for ``seconds``; for each target line on stdin, send to it
  and report what its receiver counted.
* ``connect``: for each target, the route the kernel picks (``ip -j route get`` on Linux,
  ``route -n get`` on macOS), a TCP connect with a timeout, the source address it used,
  and the listener's nonce.

Command outputs travel back *raw* (``{"rc", "out", "err"}``); every parser lives on the
controller, where it is tested against recorded real output. Every wait here is bounded:
a deadline from the config, and stdin EOF.
"""

import errno
import json
import os
import platform
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

MARKER = "ORCHCHECK "
DARWIN = sys.platform == "darwin"
PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
SYSTEM_VERSION_PLIST = "/System/Library/CoreServices/SystemVersion.plist"
ORCH_DISTRIBUTION = "mlx-orch"


def out(obj):
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def run(argv, timeout=5.0):
    """One command, bounded; ``{"rc": None}`` when it is missing or did not finish."""
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


def stdin_lines(end):
    buf = b""
    while True:
        left = end - time.monotonic()
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


def orch_version():
    """The mlx-orch installed for this interpreter (None: not installed there)."""
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return None
    try:
        return metadata.version(ORCH_DISTRIBUTION)
    except Exception:
        return None


def macos_version(path=SYSTEM_VERSION_PLIST):
    """ProductVersion / ProductBuildVersion from the plist ``sw_vers`` itself reads (no text to parse)."""
    import plistlib

    try:
        with open(path, "rb") as f:
            d = plistlib.load(f)
        return {"version": d.get("ProductVersion"), "build": d.get("ProductBuildVersion")}
    except Exception as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}


# Raw outputs JACCL depends on, parsed on the controller (orchestrator/health/jaccl_checks.py).
MACOS_COMMANDS = {
    "ibv_devices": (["ibv_devices"], 10.0),
    "rdma_ctl": (["rdma_ctl", "status"], 10.0),
    "sp_thunderbolt": (["system_profiler", "SPThunderboltDataType", "-json"], 30.0),
    "networksetup": (["networksetup", "-listallhardwareports"], 10.0),
    "ifconfig": (["ifconfig"], 5.0),
}


def macos_facts(end):
    """Every command of ``MACOS_COMMANDS`` at once (system_profiler alone can take seconds), bounded by ``end``."""
    res = {"version": macos_version()}
    threads = []
    for key, (argv, limit) in MACOS_COMMANDS.items():
        def one(key=key, argv=argv, limit=limit):
            res[key] = run(argv, timeout=max(1.0, min(limit, end - time.monotonic())))
        th = threading.Thread(target=one, daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(max(0.0, end - time.monotonic()))
    return res


def host_facts(cfg, end):
    r = {"python": sys.executable, "python_version": platform.python_version(), "system": platform.system(),
         "machine": platform.machine(), "hostname": socket.gethostname(), "platform": platform.platform(),
         "orch": orch_version()}
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
        r["disk"] = disk(cfg.get("staging", "~/.cache/mlx-orch"))
    except OSError as e:
        r["disk"] = {"error": str(e)}
    try:
        r["memory"] = memory()
    except Exception as e:
        r["memory"] = {"error": str(e)}
    if cfg.get("mpi"):
        r["mpi"] = mpi(cfg.get("mpi_prefix"))
    if cfg.get("macos") and DARWIN:
        r["macos"] = macos_facts(min(end, time.monotonic() + float(cfg.get("macos_budget", 10))))
    r["time"] = time.time()
    return r


def host(cfg, end):
    out(host_facts(cfg, end))
    for _ in stdin_lines(end):
        sys.stdout.write("T %.6f\n" % time.time())
        sys.stdout.flush()


def holder(port):
    if DARWIN:
        r = run(["lsof", "-nP", "-iTCP:%d" % port, "-sTCP:LISTEN"], timeout=3.0)
    else:
        r = run(["ss", "-Htlnp", "sport = :%d" % port], timeout=3.0)
    return r["out"].strip()[:500] if r["rc"] == 0 else None


def listen(cfg, end):
    socks, bound = {}, []
    for t in cfg["targets"]:
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
    while socks and time.monotonic() < end:
        r = select.select(list(socks) + [0], [], [], max(0.0, end - time.monotonic()))[0]
        if 0 in r and not os.read(0, 4096):
            break
        for s in r:
            if s == 0:
                continue
            c, addr = s.accept()
            c.settimeout(2.0)
            try:
                tok = c.makefile("r").readline().strip()
                c.sendall((cfg["nonce"] + "\n").encode())
                out({"accepted": addr[0], "id": socks[s]["id"], "token": tok})
                c.recv(1)  # the client closes first: TIME_WAIT stays on its side, the port is free for the ranks
            except OSError:
                pass
            finally:
                c.close()
    for s in socks:
        s.close()


def connect_one(cfg, t, res):
    ip = t["ip"]
    res["route"] = run(["route", "-n", "get", ip]) if DARWIN else run(["ip", "-j", "route", "get", ip])
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(float(cfg.get("connect_timeout", 3)))
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


def connect(cfg, end):
    results = [{"id": t["id"]} for t in cfg["targets"]]
    threads = [threading.Thread(target=connect_one, args=(cfg, t, r), daemon=True) for t, r in zip(cfg["targets"], results)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.0, end - time.monotonic()))
    out({"results": results, "ifaces": ifaces()})


def _bw_serve(conn, window):
    """One measured transfer, receiving side: count bytes for ``window`` seconds from the first one, answer the rate."""
    conn.settimeout(max(5.0, 4 * window))
    total = first = 0
    t0 = now = None
    try:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            now = time.monotonic()
            if t0 is None:
                t0, first = now, len(data)
            total += len(data)
            if now - t0 >= window:
                break
        res = {"bytes": total - first, "seconds": (now - t0) if t0 is not None else 0.0}
        conn.sendall((json.dumps(res) + "\n").encode())
        conn.settimeout(2.0)
        while conn.recv(1 << 20):  # until the sender closes: our answer is never lost to a reset
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _bw_accept(s, window):
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return
        threading.Thread(target=_bw_serve, args=(c, window), daemon=True).start()


def _bw_send(t, window, connect_timeout):
    """One measured transfer, sending side: send until the receiver answers with what it counted."""
    res = {"id": t["id"]}
    try:
        s = socket.create_connection((t["ip"], t["port"]), timeout=connect_timeout)
    except socket.timeout:
        res.update(error="timed out", errno=errno.ETIMEDOUT)
        return res
    except OSError as e:
        res.update(error=e.strerror or str(e), errno=e.errno)
        return res
    buf = memoryview(bytearray(1 << 20))
    reply = b""
    end = time.monotonic() + 4 * window + 5
    try:
        s.setblocking(False)
        while b"\n" not in reply:
            left = end - time.monotonic()
            if left <= 0:
                res["error"] = "no answer from the receiver"
                return res
            r, w, _ = select.select([s], [s], [], left)
            if r:
                chunk = s.recv(65536)
                if not chunk:
                    res["error"] = "the receiver closed the connection"
                    return res
                reply += chunk
            elif w:
                try:
                    s.send(buf)
                except (BlockingIOError, InterruptedError):
                    pass
        got = json.loads(reply.split(b"\n", 1)[0].decode())
        res.update(bytes=got["bytes"], seconds=got["seconds"])
        return res
    except (OSError, ValueError, KeyError) as e:
        res["error"] = getattr(e, "strerror", None) or str(e)
        return res
    finally:
        # Reset rather than close: what is still queued would keep the link busy into the next measurement.
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()


def linkbw(cfg, end):
    """Link bandwidth: listen on each of ``cfg["listen"]`` (a free port each) and measure what arrives; then, for
    every ``{"id", "ip", "port"}`` line on stdin, send to that address and report what the receiver counted."""
    window = float(cfg.get("seconds", 0.3))
    ports, socks = {}, []
    for ip in cfg.get("listen", []):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((ip, 0))
            s.listen(16)
            ports[ip] = s.getsockname()[1]
            socks.append(s)
            threading.Thread(target=_bw_accept, args=(s, window), daemon=True).start()
        except OSError as e:
            s.close()
            ports[ip] = {"error": e.strerror or str(e), "errno": e.errno}
    out({"ports": ports})
    for line in stdin_lines(end):
        try:
            t = json.loads(line)
        except ValueError:
            continue
        out(_bw_send(t, window, float(cfg.get("connect_timeout", 3))))
    for s in socks:
        s.close()


MODES = {"host": host, "listen": listen, "connect": connect, "linkbw": linkbw}


def main(argv):
    mode, cfg = argv[0], json.loads(argv[1])
    end = time.monotonic() + float(cfg.get("deadline", 60))
    MODES[mode](cfg, end)


if __name__ == "__main__":  # also true under ``python -c``
    main(sys.argv[1:])
