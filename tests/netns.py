"""A multi-host test cluster on one Linux machine: network namespaces + real OpenSSH sshd.

Each "host" is a network namespace with its own hostname (``host0`` .. ``host{N-1}``, set in a
private UTS namespace) and its own ``sshd``.  The hosts are wired like a Thunderbolt ring of Macs:

* **Ring links** (point-to-point veth pairs).  Link ``i`` joins host ``i`` and host ``(i+1) % N``
  and has its own /30, ``10.213.<i>.0/30``: host ``i`` is ``10.213.<i>.1`` on it (its
  ``right_ip``, interface ``ring_r``) and host ``i+1`` is ``10.213.<i>.2`` (its ``left_ip``,
  interface ``ring_l``).  So host ``i`` reaches its right neighbour at
  ``hosts[i+1].left_ip`` and its left neighbour at ``hosts[i-1].right_ip``.  There are always
  N links, also for N=2 (two "cables" between host0 and host1, each its own /30) so every host
  has exactly one ``ring_l`` and one ``ring_r``.  N=1 has no ring links (``left_ip`` /
  ``right_ip`` are None).
* **Management network**: a bridge in the root namespace (``ob<tag>``, root side
  ``10.213.<200+slot>.1/24``) with a veth ``mgmt0`` into every namespace; host ``i`` is
  ``10.213.<200+slot>.<10+i>``.  ``slot`` is 0 unless other clusters are alive at the same time
  (parallel runs / xdist), so normally host i is ``10.213.200.(10+i)``.  sshd listens there
  (port 22); the controller (the test process, root namespace) talks to hosts over it.  Hosts
  also reach each other's management addresses over the bridge (like an Ethernet LAN next to the
  Thunderbolt ring).
* Nothing can leave: namespaces have only connected routes (no default route), the root
  namespace gets ``unreachable 10.213.0.0/16`` (per-cluster metric), IPv6 is disabled on all our
  interfaces so the counters only see the test's own traffic.

Everything (keys, sshd configs and logs, ``ssh_config``, ``known_hosts``) lives in a temp dir.
``/root/.ssh`` is never touched.  Log in with either client::

    ssh -F cluster.ssh_config_path host2 hostname                   # OpenSSH
    await asyncssh.connect(cluster.hosts[2].mgmt_ip, known_hosts=cluster.known_hosts_path,
                           client_keys=[cluster.client_key_path], username="root")
    await asyncssh.connect("host2", config=[cluster.ssh_config_path])   # same, via the config

Usage in a test module::

    import pytest
    from tests.netns import netns_cluster, cluster4   # noqa: F401  (fixtures)

    pytestmark = [pytest.mark.netns, pytest.mark.slow]

    def test_something(cluster4):                 # 4 hosts, torn down after the test
        c = cluster4
        c.exec(0, ["hostname"]).stdout            # 'host0\\n', runs inside host0's namespace
        c.hosts[1].left_ip                        # host1's address on the link to host0

    def test_other(netns_cluster):                # factory: any size, any number of clusters
        c = netns_cluster(3)

    cluster4_mod = make_cluster_fixture(4, scope="module")   # shared by a whole module

or without pytest: ``with NetnsCluster(4) as c: ...``.

Teardown always happens (try/finally in ``start()``, the fixture finalizer, ``__exit__`` and an
``atexit`` backstop): kill the sshd PIDs we started (by PID), kill every other process whose
network namespace is one of ours (``ip netns del`` does NOT kill processes: a process started in a
namespace keeps it alive, so ``kill_netns_processes()`` compares ``/proc/<pid>/ns/net`` with each
namespace and kills only those), delete the namespaces, the bridge and root-side veths, the
unreachable route, the temp dir.  A run killed with SIGKILL leaves a record in
``/run/mlx-orch-netns/slot-K.json``; the next cluster that takes slot K cleans it up
(``cleanup_stale()`` does all free slots).

Skips (``pytest.skip``) only when not root or ``ip netns`` does not work.  A missing
``/usr/sbin/sshd`` is an error (install ``openssh-server``).

Note for code run over SSH inside a host: sshd gives sessions the default PATH
(``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``); use an absolute interpreter
path (e.g. ``sys.executable``) for Python.  The hosts share the root filesystem with the test.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

SSHD = "/usr/sbin/sshd"
TEST_RANGE = "10.213.0.0/16"
STATE_DIR = Path("/run/mlx-orch-netns")
MAX_SLOTS = 50  # management subnets 10.213.200.0/24 .. 10.213.249.0/24
MAX_HOSTS = 64
RING_IFACE_LEFT = "ring_l"
RING_IFACE_RIGHT = "ring_r"
MGMT_IFACE = "mgmt0"

_LIVE: set["NetnsCluster"] = set()
_STALE_CHECKED = False


class NetnsError(RuntimeError):
    """Setting up or using the namespace cluster failed."""


# --------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0,
         input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise NetnsError(f"command failed (rc={p.returncode}): {' '.join(argv)}\n"
                         f"{p.stderr.strip()}")
    return p


def _ip_batch(lines: Sequence[str], netns: str | None = None) -> None:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    _run(argv, input="\n".join(lines) + "\n")


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(namespaces: Sequence[str]) -> list[int]:
    """PIDs of all processes whose network namespace is one of ``namespaces`` (by name)."""
    ids = {i for i in (_ns_id(f"/run/netns/{ns}") for ns in namespaces) if i is not None}
    if not ids:
        return []
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if _ns_id(f"/proc/{entry}/ns/net") in ids:
            out.append(int(entry))
    return out


def kill_pids_in_netns(namespaces: Sequence[str], *, timeout: float = 3.0) -> list[int]:
    """SIGKILL every process living in one of our namespaces; wait (bounded) until gone."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = pids_in_netns(namespaces)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise NetnsError(f"processes still alive in {list(namespaces)} after SIGKILL: {pids}")
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


_AVAILABLE: tuple[bool, str] | None = None


def netns_available() -> tuple[bool, str]:
    """(ok, reason): root and a working ``ip netns``.  Probes once by adding a namespace."""
    global _AVAILABLE
    if _AVAILABLE is not None:
        return _AVAILABLE
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _AVAILABLE = (False, "netns cluster needs root (network namespaces, veth, sshd)")
    elif shutil.which("ip") is None:
        _AVAILABLE = (False, "`ip` (iproute2) not found; netns cluster unavailable")
    else:
        probe = f"orchprobe-{secrets.token_hex(3)}"
        p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if p.returncode != 0:
            _AVAILABLE = (False, f"`ip netns add` does not work here: {p.stderr.strip()}")
        else:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
            _AVAILABLE = (True, "")
    return _AVAILABLE


def require_netns() -> None:
    ok, reason = netns_available()
    if not ok:
        pytest.skip(reason)


# --------------------------------------------------------------------------- slots


def _cleanup_record(rec: dict[str, Any]) -> list[str]:
    """Remove everything a (possibly dead) cluster recorded.  Returns error strings."""
    errors: list[str] = []
    namespaces = rec.get("namespaces", [])
    for pid in rec.get("sshd_pids", []):
        # only kill a recorded pid if it still lives in one of the recorded namespaces
        if pid in pids_in_netns(namespaces):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        kill_pids_in_netns(namespaces)
    except NetnsError as e:
        errors.append(str(e))
    # root-side links first: deleting a veth end removes its peer synchronously, whereas the
    # kernel destroys a deleted namespace (and the veths in it) asynchronously
    for dev in rec.get("root_links", []):
        if os.path.exists(f"/sys/class/net/{dev}"):
            p = _run(["ip", "link", "del", dev], check=False)
            if p.returncode != 0 and os.path.exists(f"/sys/class/net/{dev}"):
                errors.append(f"ip link del {dev}: {p.stderr.strip()}")
    for ns in namespaces:
        if os.path.exists(f"/run/netns/{ns}"):
            p = _run(["ip", "netns", "del", ns], check=False)
            if p.returncode != 0:
                errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
    metric = rec.get("route_metric")
    if metric is not None:
        for _ in range(4):  # remove every copy we may have added
            p = _run(["ip", "route", "del", "unreachable", TEST_RANGE, "metric", str(metric)],
                     check=False)
            if p.returncode != 0:
                break
    tmp = rec.get("tmpdir")
    if tmp and os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    return errors


class _Slot:
    """An exclusive lease on management subnet 10.213.(200+K).0/24, held by flock for the
    cluster's lifetime.  Acquiring a free slot first cleans whatever a dead owner left."""

    def __init__(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        for k in range(MAX_SLOTS):
            fd = os.open(STATE_DIR / f"slot-{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.index, self.fd = k, fd
            self.record_path = STATE_DIR / f"slot-{k}.json"
            self._clean_stale()
            if self._subnet_in_use():
                # someone outside our locking uses this subnet: leave it alone, try the next
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                continue
            return
        raise NetnsError(f"no free management subnet slot (all {MAX_SLOTS} in use)")

    @property
    def subnet_octet(self) -> int:
        return 200 + self.index

    def _subnet_in_use(self) -> bool:
        p = _run(["ip", "-o", "-4", "addr", "show"], check=False)
        return f" 10.213.{self.subnet_octet}." in p.stdout

    def _clean_stale(self) -> None:
        if self.record_path.exists():
            try:
                rec = json.loads(self.record_path.read_text())
            except (OSError, ValueError):
                rec = {}
            _cleanup_record(rec)
            self.record_path.unlink(missing_ok=True)

    def write(self, rec: dict[str, Any]) -> None:
        tmp = self.record_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.record_path)

    def release(self) -> None:
        self.record_path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def cleanup_stale() -> int:
    """Clean leftovers of clusters whose owner died (SIGKILL).  Returns slots cleaned."""
    if not STATE_DIR.exists():
        return 0
    n = 0
    for k in range(MAX_SLOTS):
        rec_path = STATE_DIR / f"slot-{k}.json"
        if not rec_path.exists():
            continue
        fd = os.open(STATE_DIR / f"slot-{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            rec = json.loads(rec_path.read_text())
            _cleanup_record(rec)
            rec_path.unlink(missing_ok=True)
            n += 1
        except (OSError, ValueError):
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    return n


# --------------------------------------------------------------------------- the cluster


@dataclass
class NetnsHost:
    index: int
    name: str                   # hostname inside the host and ssh alias: "host<i>"
    namespace: str              # network namespace name: "orch<N>-<tag>-<i>"
    mgmt_ip: str                # sshd listens here (port 22); reachable from the root ns
    left_ip: str | None         # own address on ring link (i-1)%N, iface ring_l (to host i-1)
    right_ip: str | None        # own address on ring link i, iface ring_r (to host i+1)
    left_peer_ip: str | None    # host i-1's address on that link (== hosts[i-1].right_ip)
    right_peer_ip: str | None   # host i+1's address on that link (== hosts[i+1].left_ip)
    left_link: int | None       # ring link index on the left  ((i-1)%N)
    right_link: int | None      # ring link index on the right (i)
    left_iface: str = RING_IFACE_LEFT
    right_iface: str = RING_IFACE_RIGHT
    mgmt_iface: str = MGMT_IFACE
    host_key_path: str = ""
    sshd_config_path: str = ""
    sshd_log_path: str = ""
    sshd_pid: int | None = None

    @property
    def ring_ips(self) -> list[str]:
        return [ip for ip in (self.right_ip, self.left_ip) if ip]


@dataclass
class ExtraLink:
    """A cable added with ``NetnsCluster.add_link``: host a is ``ip_a`` and host b ``ip_b`` on a /30, both on ``iface``."""
    index: int
    a: int
    b: int
    ip_a: str
    ip_b: str
    iface: str


class NetnsCluster:
    """N namespace "hosts" in a ring, each with its own sshd.  Context manager.

    Attributes: n, tag, hosts (list[NetnsHost]), namespaces, bridge, mgmt_subnet,
    mgmt_gateway, tmpdir, ssh_config_path, known_hosts_path, client_key_path,
    client_pubkey_path, sshd_pids.
    """

    def __init__(self, n: int = 4, *, sshd: bool = True, start_timeout: float = 10.0) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"n must be in 1..{MAX_HOSTS}, got {n}")
        self.n = n
        self.tag = secrets.token_hex(3)
        self.with_sshd = sshd
        self.start_timeout = start_timeout
        self.namespaces = [f"orch{n}-{self.tag}-{i}" for i in range(n)]
        self.bridge = f"ob{self.tag}"                      # <= 15 chars
        self.root_mgmt_links = [f"om{self.tag}-{i}" for i in range(n)]
        self.hosts: list[NetnsHost] = []
        self.tmpdir = ""
        self.ssh_config_path = ""
        self.known_hosts_path = ""
        self.client_key_path = ""
        self.client_pubkey_path = ""
        self.mgmt_subnet = ""
        self.mgmt_gateway = ""
        self._slot: _Slot | None = None
        self._route_metric: int | None = None
        self._sshd_procs: list[subprocess.Popen] = []
        self._popens: list[subprocess.Popen] = []
        self._started = False
        self._torn_down = False

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> "NetnsCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.teardown()

    def start(self) -> "NetnsCluster":
        if self._started:
            return self
        self._started = True
        ok, reason = netns_available()
        if not ok:
            raise NetnsError(reason)
        if self.with_sshd and not os.access(SSHD, os.X_OK):
            raise NetnsError(f"{SSHD} not found: install openssh-server (apt-get install "
                             "openssh-server) to run the netns cluster tests")
        global _STALE_CHECKED
        if not _STALE_CHECKED:  # once per process: leftovers of runs that were SIGKILLed
            _STALE_CHECKED = True
            cleanup_stale()
        _LIVE.add(self)
        try:
            self._slot = _Slot()
            octet = self._slot.subnet_octet
            self.mgmt_subnet = f"10.213.{octet}.0/24"
            self.mgmt_gateway = f"10.213.{octet}.1"
            self._route_metric = 1000 + self._slot.index
            self.tmpdir = tempfile.mkdtemp(prefix=f"orch-netns-{self.tag}-")
            self._record()  # before creating anything: a crash from here on is recoverable
            self._plan_hosts(octet)
            self._create_network()
            if self.with_sshd:
                self._write_keys_and_configs()
                self._start_sshds()
                self._wait_sshds()
        except BaseException:
            self.teardown()
            raise
        return self

    def _record(self) -> None:
        assert self._slot is not None
        self._slot.write({
            "owner_pid": os.getpid(),
            "namespaces": self.namespaces,
            "root_links": [*self.root_mgmt_links, self.bridge],
            "route_metric": self._route_metric,
            "tmpdir": self.tmpdir,
            "sshd_pids": self.sshd_pids,
        })

    def _plan_hosts(self, octet: int) -> None:
        n = self.n
        for i in range(n):
            if n >= 2:
                ll, rl = (i - 1) % n, i
                left_ip, right_ip = f"10.213.{ll}.2", f"10.213.{rl}.1"
                left_peer, right_peer = f"10.213.{ll}.1", f"10.213.{rl}.2"
            else:
                ll = rl = None
                left_ip = right_ip = left_peer = right_peer = None
            self.hosts.append(NetnsHost(
                index=i, name=f"host{i}", namespace=self.namespaces[i],
                mgmt_ip=f"10.213.{octet}.{10 + i}",
                left_ip=left_ip, right_ip=right_ip,
                left_peer_ip=left_peer, right_peer_ip=right_peer,
                left_link=ll, right_link=rl))

    def _create_network(self) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            # no IPv6 noise (RS/DAD/MLD) on any interface created in or moved into the ns
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                  "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                 check=False)
        root: list[str] = [f"link add {self.bridge} type bridge"]
        for i, h in enumerate(self.hosts):
            root.append(f"link add {self.root_mgmt_links[i]} type veth "
                        f"peer name {MGMT_IFACE} netns {h.namespace}")
        if self.n >= 2:
            for i in range(self.n):
                j = (i + 1) % self.n
                root.append(f"link add {RING_IFACE_RIGHT} netns {self.namespaces[i]} type veth "
                            f"peer name {RING_IFACE_LEFT} netns {self.namespaces[j]}")
        _ip_batch(root)
        for dev in [self.bridge, *self.root_mgmt_links]:
            try:
                Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6").write_text("1")
            except OSError:
                pass
        root = [f"addr add {self.mgmt_gateway}/24 dev {self.bridge}",
                f"link set {self.bridge} up"]
        for dev in self.root_mgmt_links:
            root += [f"link set {dev} master {self.bridge}", f"link set {dev} up"]
        _ip_batch(root)
        _run(["ip", "route", "add", "unreachable", TEST_RANGE, "metric", str(self._route_metric)])
        for h in self.hosts:
            cmds = ["link set lo up",
                    f"addr add {h.mgmt_ip}/24 dev {MGMT_IFACE}", f"link set {MGMT_IFACE} up"]
            if h.left_ip:
                cmds += [f"addr add {h.left_ip}/30 dev {RING_IFACE_LEFT}",
                         f"link set {RING_IFACE_LEFT} up",
                         f"addr add {h.right_ip}/30 dev {RING_IFACE_RIGHT}",
                         f"link set {RING_IFACE_RIGHT} up"]
            _ip_batch(cmds, netns=h.namespace)

    def _write_keys_and_configs(self) -> None:
        tmp = Path(self.tmpdir)
        self.client_key_path = str(tmp / "id_ed25519")
        self.client_pubkey_path = self.client_key_path + ".pub"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"orch-test-{self.tag}",
              "-f", self.client_key_path])
        authorized = tmp / "authorized_keys"
        authorized.write_text(Path(self.client_pubkey_path).read_text())
        authorized.chmod(0o600)
        known_lines = []
        for h in self.hosts:
            hdir = tmp / h.name
            hdir.mkdir()
            h.host_key_path = str(hdir / "ssh_host_ed25519_key")
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name,
                  "-f", h.host_key_path])
            pub = Path(h.host_key_path + ".pub").read_text().split()
            known_lines.append(f"{h.mgmt_ip},{h.name} {pub[0]} {pub[1]}")
            h.sshd_config_path = str(hdir / "sshd_config")
            h.sshd_log_path = str(hdir / "sshd.log")
            Path(h.sshd_config_path).write_text("\n".join([
                f"ListenAddress {h.mgmt_ip}",
                "Port 22",
                f"HostKey {h.host_key_path}",
                f"PidFile {hdir / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "UseDNS no",
                "ClientAliveInterval 1",
                "ClientAliveCountMax 3",
                "MaxStartups 200",
                "MaxSessions 100",
                "PrintMotd no",
                "PrintLastLog no",
                "X11Forwarding no",
                "AllowTcpForwarding yes",
                "AcceptEnv *",
                "Subsystem sftp internal-sftp",
                "LogLevel INFO",
                "",
            ]))
        self.known_hosts_path = str(tmp / "known_hosts")
        Path(self.known_hosts_path).write_text("\n".join(known_lines) + "\n")
        self.ssh_config_path = str(tmp / "ssh_config")
        cfg = []
        for h in self.hosts:
            cfg += [f"Host {h.name}", f"  HostName {h.mgmt_ip}", ""]
        cfg += ["Host *",
                "  User root",
                "  Port 22",
                f"  IdentityFile {self.client_key_path}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {self.known_hosts_path}",
                "  GlobalKnownHostsFile /dev/null",
                "  StrictHostKeyChecking yes",
                "  BatchMode yes",
                "  PasswordAuthentication no",
                "  ConnectTimeout 5",
                "  ServerAliveInterval 2",
                "  ServerAliveCountMax 3",
                "  LogLevel ERROR",
                ""]
        Path(self.ssh_config_path).write_text("\n".join(cfg))

    def _start_sshds(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for h in self.hosts:
            log = open(h.sshd_log_path, "wb")
            try:
                p = subprocess.Popen(
                    ["ip", "netns", "exec", h.namespace, "unshare", "--uts", "sh", "-c",
                     f'hostname {h.name} && exec {SSHD} -D -e -f "$0"', h.sshd_config_path],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            finally:
                log.close()
            # ip netns exec, unshare and sh all exec(): p.pid is sshd's pid
            self._sshd_procs.append(p)
            h.sshd_pid = p.pid
            self._record()

    def _wait_sshds(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = list(self.hosts)
        while pending:
            for h, p in [(h, self._sshd_procs[h.index]) for h in pending]:
                if p.poll() is not None:
                    raise NetnsError(f"sshd for {h.name} ({h.namespace}) exited with "
                                     f"{p.returncode}:\n{self._log_tail(h)}")
                try:
                    with socket.create_connection((h.mgmt_ip, 22), timeout=0.5) as s:
                        s.settimeout(1.0)
                        if s.recv(4).startswith(b"SSH-"):
                            pending.remove(h)
                except OSError:
                    pass
            if pending and time.monotonic() > deadline:
                raise NetnsError(
                    f"sshd not accepting connections within {self.start_timeout:.0f}s on "
                    + ", ".join(f"{h.name} {h.mgmt_ip}:22" for h in pending) + "\n"
                    + "\n".join(self._log_tail(h) for h in pending))
            if pending:
                time.sleep(0.05)

    def _log_tail(self, h: NetnsHost, lines: int = 20) -> str:
        try:
            text = Path(h.sshd_log_path).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"[{h.name}] (no sshd log)"
        return "\n".join(f"[{h.name} sshd] {line}" for line in text)

    def teardown(self) -> None:
        """Remove everything; idempotent; raises NetnsError listing what could not be removed
        (after having tried every step)."""
        if self._torn_down:
            return
        self._torn_down = True
        errors: list[str] = []
        # 1. our sshds, by PID: TERM, bounded wait, KILL
        for p in self._sshd_procs:
            if p.poll() is None:
                try:
                    p.terminate()
                except ProcessLookupError:
                    pass
        for p in [*self._sshd_procs, *self._popens]:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    errors.append(f"pid {p.pid} did not die")
            except Exception as e:  # noqa: BLE001
                errors.append(f"wait {p.pid}: {e}")
        # 2. anything else living in our namespaces (ssh sessions, test processes)
        try:
            self.kill_netns_processes()
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
        for p in self._popens:  # reap tracked children
            try:
                p.wait(timeout=1)
            except Exception:  # noqa: BLE001
                pass
        # 3. namespaces, root-side links, route, tmpdir
        errors += _cleanup_record({
            "namespaces": self.namespaces,
            "root_links": [*self.root_mgmt_links, self.bridge],  # veths, then the bridge
            "route_metric": self._route_metric,
            "tmpdir": self.tmpdir,
        })
        if self._slot is not None:
            if not errors:
                self._slot.release()
            else:  # keep the record so the next run retries the cleanup
                fcntl.flock(self._slot.fd, fcntl.LOCK_UN)
                os.close(self._slot.fd)
            self._slot = None
        _LIVE.discard(self)
        if errors:
            raise NetnsError("netns cluster teardown incomplete:\n" + "\n".join(errors))

    # ----------------------------------------------------------------- inspection

    @property
    def sshd_pids(self) -> list[int]:
        return [p.pid for p in self._sshd_procs]

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (empty after a clean teardown)."""
        left = [f"netns {ns}" for ns in self.namespaces if os.path.exists(f"/run/netns/{ns}")]
        listed = _run(["ip", "netns", "list"], check=False).stdout.split()
        left += [f"netns {ns} (ip netns list)" for ns in self.namespaces if ns in listed]
        left += [f"link {d}" for d in [self.bridge, *self.root_mgmt_links]
                 if os.path.exists(f"/sys/class/net/{d}")]
        left += [f"pid {pid}" for pid in self.sshd_pids if _pid_alive(pid)]
        if self._route_metric is not None:
            routes = _run(["ip", "route", "show", "type", "unreachable"], check=False).stdout
            if f"metric {self._route_metric}" in routes and self._slot is None:
                # only ours if no other live cluster holds the same slot now
                if not any(c._route_metric == self._route_metric for c in _LIVE):
                    left.append(f"route unreachable {TEST_RANGE} metric {self._route_metric}")
        if self.tmpdir and os.path.exists(self.tmpdir):
            left.append(f"tmpdir {self.tmpdir}")
        return left

    # ----------------------------------------------------------------- running things

    def ns_prefix(self, i: int, *, uts: bool = True) -> list[str]:
        """argv prefix that runs a command inside host i (its network namespace and, while its
        sshd lives, its UTS namespace so `hostname` says host<i>)."""
        h = self.hosts[i]
        pre = ["ip", "netns", "exec", h.namespace]
        if uts and h.sshd_pid and _pid_alive(h.sshd_pid):
            pre += ["nsenter", f"--uts=/proc/{h.sshd_pid}/ns/uts", "--"]
        return pre

    def exec(self, i: int, argv: Sequence[str] | str, *, timeout: float = 30.0,
             check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
        """Run argv (a list, or a string for `sh -c`) inside host i; returns CompletedProcess
        (text, captured output by default; any subprocess.run keyword can be passed)."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        kw.setdefault("capture_output", not ("stdout" in kw or "stderr" in kw))
        kw.setdefault("text", True)
        return subprocess.run(self.ns_prefix(i) + list(argv), timeout=timeout, check=check, **kw)

    def popen(self, i: int, argv: Sequence[str] | str, **kw: Any) -> subprocess.Popen:
        """Start argv in the background inside host i; killed at teardown."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        p = subprocess.Popen(self.ns_prefix(i) + list(argv), **kw)
        self._popens.append(p)
        return p

    def ssh_argv(self, i: int, command: str | Sequence[str] = ()) -> list[str]:
        """OpenSSH argv: ["ssh", "-F", ssh_config, "host<i>", *command]."""
        cmd = [command] if isinstance(command, str) else list(command)
        return ["ssh", "-F", self.ssh_config_path, self.hosts[i].name, *cmd]

    def asyncssh_kwargs(self, i: int) -> dict[str, Any]:
        """kwargs for asyncssh.connect(**kw) to host i with strict host key checking."""
        return dict(host=self.hosts[i].mgmt_ip, port=22, username="root",
                    known_hosts=self.known_hosts_path, client_keys=[self.client_key_path],
                    config=[])

    def running_processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of what lives in the hosts besides our sshd listeners; zombies excluded."""
        out = []
        for pid in pids_in_netns(self.namespaces):
            if pid in self.sshd_pids:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                out.append((pid, cmd))
        return out

    def kill_netns_processes(self) -> list[int]:
        """SIGKILL every process whose network namespace is one of ours; returns their pids.
        (`ip netns del` only removes the name; processes inside keep running.)"""
        return kill_pids_in_netns(self.namespaces)

    # ----------------------------------------------------------------- links

    def link_ends(self, link: int) -> tuple[tuple[int, str], tuple[int, str]]:
        """((host, iface), (host, iface)) of ring link `link`."""
        if self.n < 2:
            raise NetnsError("a 1-host cluster has no ring links")
        link %= self.n
        return (link, RING_IFACE_RIGHT), ((link + 1) % self.n, RING_IFACE_LEFT)

    def _set_link(self, link: int, state: str) -> None:
        for host, iface in self.link_ends(link):
            _run(["ip", "-n", self.namespaces[host], "link", "set", iface, state])

    def link_down(self, link: int) -> None:
        """Pull the cable of ring link `link` (between host link and host link+1): both ends down."""
        self._set_link(link, "down")

    def link_up(self, link: int) -> None:
        self._set_link(link, "up")

    def add_link(self, a: int, b: int) -> "ExtraLink":
        """One more point-to-point "cable" (a veth pair) between hosts a and b, e.g. the chords of a full mesh.

        Extra link k is ``10.213.<100+k>.0/30`` (a is .1, b is .2), interface ``mesh<k>`` at both ends;
        it goes away with the namespaces at teardown."""
        if a == b or not (0 <= a < self.n and 0 <= b < self.n):
            raise ValueError(f"add_link({a}, {b}): two different hosts of 0..{self.n - 1}")
        extra = getattr(self, "extra_links", None)
        if extra is None:
            extra = self.extra_links = []
        k = len(extra)
        if k >= 100:
            raise NetnsError("at most 100 extra links")
        link = ExtraLink(index=k, a=a, b=b, ip_a=f"10.213.{100 + k}.1", ip_b=f"10.213.{100 + k}.2",
                         iface=f"mesh{k}")
        _ip_batch([f"link add {link.iface} netns {self.namespaces[a]} type veth "
                   f"peer name {link.iface} netns {self.namespaces[b]}"])
        _ip_batch([f"addr add {link.ip_a}/30 dev {link.iface}", f"link set {link.iface} up"], self.namespaces[a])
        _ip_batch([f"addr add {link.ip_b}/30 dev {link.iface}", f"link set {link.iface} up"], self.namespaces[b])
        extra.append(link)
        return link

    def full_mesh(self) -> list["ExtraLink"]:
        """Add a cable between every pair of hosts the ring does not already join (4 hosts: 0-2 and 1-3)."""
        ring = {frozenset((i, (i + 1) % self.n)) for i in range(self.n)} if self.n >= 2 else set()
        return [self.add_link(a, b) for a in range(self.n) for b in range(a + 1, self.n)
                if frozenset((a, b)) not in ring]

    def shape(self, i: int, iface: str, mbit: float) -> None:
        """Limit what host i sends out of ``iface`` to ``mbit`` Mbit/s (tc tbf); ``unshape`` removes it
        (teardown does too, with the namespace)."""
        burst = max(96, int(mbit * 1000 / 8 / 100))  # tc's kb (KiB): ~10 ms at that rate, at least one 64 KiB GSO packet
        _run(["ip", "netns", "exec", self.namespaces[i], "tc", "qdisc", "replace", "dev", iface, "root", "tbf",
              "rate", f"{mbit}mbit", "burst", f"{burst}kb", "latency", "400ms"])

    def unshape(self, i: int, iface: str) -> None:
        _run(["ip", "netns", "exec", self.namespaces[i], "tc", "qdisc", "del", "dev", iface, "root"], check=False)

    def qdiscs(self, i: int) -> str:
        """``tc qdisc show`` inside host i (tests check that shaping was removed)."""
        return _run(["ip", "netns", "exec", self.namespaces[i], "tc", "qdisc", "show"], check=False).stdout

    def iface_counters(self, i: int, *, mgmt: bool = False) -> dict[str, dict[str, int]]:
        """{iface: {"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"}} for host i's ring
        interfaces (ring_l, ring_r; plus mgmt0 if mgmt=True)."""
        p = _run(["ip", "-n", self.namespaces[i], "-s", "-j", "link", "show"])
        wanted = {RING_IFACE_LEFT, RING_IFACE_RIGHT} | ({MGMT_IFACE} if mgmt else set())
        out: dict[str, dict[str, int]] = {}
        for link in json.loads(p.stdout):
            name = link.get("ifname")
            if name in wanted:
                st = link.get("stats64") or link.get("stats") or {}
                out[name] = {"rx_bytes": st["rx"]["bytes"], "tx_bytes": st["tx"]["bytes"],
                             "rx_packets": st["rx"]["packets"],
                             "tx_packets": st["tx"]["packets"]}
        return out

    def __repr__(self) -> str:
        return f"NetnsCluster(n={self.n}, tag={self.tag}, mgmt={self.mgmt_subnet or '-'})"


@atexit.register
def _teardown_live() -> None:
    for c in list(_LIVE):
        try:
            c.teardown()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- pytest fixtures


def make_cluster_fixture(n: int, *, scope: str = "function", name: str | None = None,
                         **opts: Any) -> Callable:
    """A fixture giving a started NetnsCluster(n), torn down at the end of `scope`.
    Use at module level: ``cluster3_mod = make_cluster_fixture(3, scope="module")``."""

    @pytest.fixture(scope=scope, name=name)
    def _fixture() -> Iterator[NetnsCluster]:
        require_netns()
        c = NetnsCluster(n, **opts)
        try:
            c.start()
            yield c
        finally:
            c.teardown()

    return _fixture


@pytest.fixture
def netns_cluster() -> Iterator[Callable[..., NetnsCluster]]:
    """Factory: ``c = netns_cluster(n, sshd=True)`` returns a started cluster; all clusters made
    are torn down when the test ends (even if it fails)."""
    require_netns()
    made: list[NetnsCluster] = []

    def make(n: int = 4, **opts: Any) -> NetnsCluster:
        c = NetnsCluster(n, **opts)
        made.append(c)
        return c.start()

    try:
        yield make
    finally:
        errors = []
        for c in reversed(made):
            try:
                c.teardown()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        if errors:
            raise NetnsError("\n".join(errors))


cluster2 = make_cluster_fixture(2, name="cluster2")
cluster3 = make_cluster_fixture(3, name="cluster3")
cluster4 = make_cluster_fixture(4, name="cluster4")
