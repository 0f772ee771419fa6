"""The rank guard: the parent of every rank, local or remote.

``python -S -m orchestrator.runtime.guard [--no-stdin] [--deferred] [--token-line] -- CMD ARGS...``

Why it exists: a launcher cannot reliably kill a remote rank. sshd running
as root ignores SSH "signal" requests, and closing a channel without a pty
leaves the remote process running; locally a controller killed with SIGKILL
cannot clean up at all. So the guard

* starts CMD in a new session (its own process group, so grandchildren such
  as data-loader workers are reached by one ``killpg``) and, on Linux, is a
  *child subreaper*: a descendant that escapes the group (a ``setsid``
  daemon, a double fork) is re-parented to the guard instead of to init, and
  the guard kills it with the rest. macOS has no subreaper: there the guard
  snapshots the process tree (``ps``) every second and at the end, and kills
  the rank's descendants it has seen (one that is started and orphaned
  between two snapshots can escape);
* tells the controller the rank's pid with a ``spawned`` event, and with a
  ``listening`` event when the rank's ring socket (``ORCH_LISTEN``) is bound:
  MLX holds the GIL inside ``init`` so the rank itself cannot say so. The
  guard only looks once the rank is about to call ``mx.distributed.init``
  (the bootstrap writes one byte to ``ORCH_INIT_FD``), then with back-off
  (1 ms doubling to 50 ms, 120 s at most), and it looks at the rank's *own*
  sockets (Linux: ``/proc/<pid>/net/tcp*`` entries whose inode is one of the
  rank's fds; macOS: ``lsof -p PID``), not at whatever on the host uses the
  port;
* reads control lines on its stdin: ``go`` opens the rank's start gate (a pipe
  whose read end the rank gets as ``ORCH_GATE_FD``), ``release`` ends a hold;
* with ``ORCH_STDIN=pipe`` (``orch run --stdin``) gives the rank a pipe as its
  stdin and writes to it what ``stdin <base64>`` lines carry; ``stdin-eof``
  closes it. The program's input and the control channel share one stream
  (an SSH channel has only one stdin) but cannot be confused: user bytes only
  ever arrive base64-encoded, so the channel's own end of file still means
  "stop". Writes never block the loop: what the rank has not read yet waits
  in memory. Without ``ORCH_STDIN`` the rank's stdin is /dev/null. A
  ``--no-stdin`` guard (mpirun forwards its stdin to rank 0 only, and never
  its end of file) reads only ``stdin`` lines there, and its end of file
  ends the rank's input, nothing more;
* with ``--token-line`` reads ``token <hex>`` as its first stdin line *before*
  it starts the rank (a ``--deferred`` guard finds it in its configuration
  line under ``"token"``) and puts it in every event it writes: the rank never
  sees it (not in its environment, argv or relayed configuration), so nothing
  the rank prints can pass for a guard event;
* treats end-of-file on stdin (the controller closed it, died, or the SSH
  connection dropped) and SIGTERM/SIGHUP/SIGINT as "stop": SIGTERM to the
  rank's group and descendants, SIGKILL after ``ORCH_GRACE_S`` (default 1 s).
  Whatever ends the main loop (an exception included) ends in that same stop:
  it runs in a ``finally``;
* when the rank exits, kills what is left of its group and descendants and
  exits the same way the rank did (same code, or re-raises the same signal),
  so the controller sees the rank's own status;
* with ``ORCH_GUARD_RSS=1`` (and ``ORCH_EVENTS=1``) reports the rank's memory,
  its process tree's CPU time and whether it is stopped every 2 s as ``rss``
  events, for any program, ours or not (the controller's idle-hang watchdog
  reads the CPU time);
* on a ``dump`` control line sends the rank the stack-dump signal, or, if the
  rank is stopped (it could not answer), says so in its ``dump`` event.

The ring start's part (the gate and init pipes, the listening watch, the hold of
rank 0) is ``runtime/ringstart.py``'s ``RankStart``; the guard's loop drives it.

``--no-stdin`` is for launchers that give ranks no stdin (mpirun forwards
stdin to rank 0 only): then signals stop the rank, and so does the death of
the guard's parent (checked every 0.5 s), so a SIGKILLed mpirun leaves no rank.
On Linux the rank also gets ``PR_SET_PDEATHSIG``: a guard killed with SIGKILL
takes its rank with it.

Only the standard library, on every platform branch: this runs as
``python -S`` (no site-packages) before every rank and must be fast.
"""

from __future__ import annotations

import binascii
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time

from orchestrator import protocol
# The ring start's half in the rank (gate, init byte, listening watch, hold): stdlib only, like us.
from orchestrator.runtime.ringstart import RankStart, has_accepted, is_listening  # noqa: F401  (re-exported)

# The environment variables the guard reads and sets are named in protocol.py.
ENV_INIT_FD = protocol.ENV_INIT_FD
ENV_GATE_FD = protocol.ENV_GATE_FD
ENV_CONFIG_FD = protocol.ENV_CONFIG_FD
ENV_GUARD_RSS = protocol.ENV_GUARD_RSS
ENV_HOLD_MAX_S = protocol.ENV_HOLD_MAX_S

HOLD_MAX_S = protocol.HOLD_MAX_S
TOKEN_WAIT_S = protocol.TOKEN_WAIT_S
CONFIG_WAIT_S = protocol.CONFIG_WAIT_S
TREE_EVERY_S = 1.0  # macOS: process-tree snapshots
RSS_EVERY_S = 2.0
PARENT_EVERY_S = 0.5
KILL_ROUNDS = 100  # SIGKILL sweeps (20 ms apart) until nothing of the rank is left

_LINUX_PR_SET_PDEATHSIG = 1
_LINUX_PR_SET_DUMPABLE = 4
_LINUX_PR_SET_CHILD_SUBREAPER = 36


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _run(argv: list[str]) -> subprocess.CompletedProcess | None:
    """A small helper command (lsof, ps), bounded; None if it cannot run."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def _prctl(option: int, value: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# ---- the rank's state ----------------------------------------------------------

def is_stopped(pid: int) -> bool:
    if _linux():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
        except (OSError, IndexError):
            return False
    r = _run(["ps", "-o", "stat=", "-p", str(pid)])
    return r is not None and r.returncode == 0 and r.stdout.strip().startswith("T")


# ---- the process tree ----------------------------------------------------------

def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every live (not zombie) process this user can see; {} if unknown."""
    table: dict[int, tuple[int, int]] = {}
    if _linux():
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if len(fields) > 2 and fields[0] != b"Z":
                table[int(name)] = (int(fields[1]), int(fields[2]))
        return table
    r = _run(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) >= 4 and all(p.isdigit() for p in parts[:3]) and not parts[3].startswith("Z"):
            table[int(parts[0])] = (int(parts[1]), int(parts[2]))
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """Every process below ``roots`` in ``table`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in found and c not in roots:
                found.add(c)
                todo.append(c)
    return found


class Tree:
    """Everything the rank started, wherever it went: what ``members()`` returns gets signalled.

    Linux: the guard is a subreaper (set before the rank starts), so every
    descendant of the rank stays a descendant of the guard and the live
    ``/proc`` walk is exact. macOS: the rank's process group plus its
    descendants as seen by snapshots (``members()`` every second and before
    each kill); a pid seen once is kept while it is alive and its parent is the
    one we saw or launchd (it was orphaned), not once the pid is reused.
    """

    def __init__(self, rank_pid: int, subreaper: bool) -> None:
        self.rank_pid = rank_pid
        self.subreaper = subreaper
        self.known: dict[int, int] = {}  # macOS: pid -> the parent we saw

    def members(self) -> set[int]:
        """The live (not zombie) processes of the rank: itself, its group, its descendants."""
        table = process_table()
        me = os.getpid()
        group = {p for p, (_, pgid) in table.items() if pgid == self.rank_pid}
        if self.subreaper:
            return (descendants({me}, table) | group) - {me}
        if not table:  # ps failed this time: keep what we knew
            return set(self.known) | {self.rank_pid}
        self.known = {p: pp for p, pp in self.known.items() if p in table and table[p][0] in (pp, 1)}
        for pid in descendants({self.rank_pid, *self.known, *group}, table):
            self.known.setdefault(pid, table[pid][0])
        alive = set(self.known) | group
        if self.rank_pid in table:
            alive.add(self.rank_pid)
        return alive - {me}


# ---- memory --------------------------------------------------------------------

def rss_bytes(pids: list[int]) -> dict[int, int]:
    """Resident set size of each pid that still exists."""
    out: dict[int, int] = {}
    if _linux():
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    out[pid] = int(f.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                pass
        return out
    if not pids:
        return out
    r = _run(["ps", "-o", "pid=,rss=", "-p", ",".join(map(str, pids))])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1]) * 1024  # ps reports KiB
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU time (user + system, seconds) each pid that still exists has used.

    Linux: ``/proc/<pid>/stat``, with the time of its exited children it has
    waited for (``cutime``/``cstime``), so a shell loop of short commands shows
    progress too. macOS: ``ps -o time=`` (the process itself only).
    """
    out: dict[int, float] = {}
    if _linux():
        tick = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
                out[pid] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
            except (OSError, IndexError, ValueError):
                pass
        return out
    if not pids:
        return out
    r = _run(["ps", "-o", "pid=,time=", "-p", ",".join(map(str, pids))])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            secs = parse_ps_time(parts[1])
            if secs is not None:
                out[int(parts[0])] = secs
    return out


def ps_sample(pids: list[int]) -> tuple[dict[int, int], dict[int, float], set[int]]:
    """macOS: RSS (bytes), CPU time (s) and the stopped ones of ``pids``, from one ``ps``."""
    sizes: dict[int, int] = {}
    cpu: dict[int, float] = {}
    stopped: set[int] = set()
    if not pids:
        return sizes, cpu, stopped
    r = _run(["ps", "-o", "pid=,rss=,time=,stat=", "-p", ",".join(map(str, pids))])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        pid = int(parts[0])
        sizes[pid] = int(parts[1]) * 1024  # ps reports KiB
        secs = parse_ps_time(parts[2])
        if secs is not None:
            cpu[pid] = secs
        if parts[3].startswith("T"):
            stopped.add(pid)
    return sizes, cpu, stopped


def parse_ps_time(text: str) -> float | None:
    """``ps``'s cumulative CPU time: macOS ``M:SS.ss`` (minutes may pass 59), procps ``[DD-]HH:MM:SS``."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not rest or len(parts) > 3:
        return None
    try:
        total = 0.0
        for part in parts:
            if not part.replace(".", "", 1).isdigit():
                return None
            total = total * 60 + float(part)
        return total + (int(days) * 86400 if days else 0)
    except ValueError:
        return None


def system_available_bytes() -> int | None:
    """Linux: MemAvailable. macOS: None (no recorded vm_stat output to parse against yet)."""
    if not _linux():
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bind_cpus(pid: int, spec: str) -> None:
    """Pin ``pid`` to its share of this host's CPUs; ``spec`` is "i/n" (local rank i of n).

    Contiguous blocks keep a rank's threads on neighbouring cores. Linux only:
    macOS has no CPU affinity API, so there ``--bind`` is a no-op.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    i, n = (int(x) for x in spec.split("/"))
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // n)
    mine = cpus[i * per:(i + 1) * per] or [cpus[i % len(cpus)]]
    try:
        os.sched_setaffinity(pid, mine)
    except OSError:
        pass


# ---- stdin ---------------------------------------------------------------------

def _read_line(fd: int, timeout_s: float, buf: bytes = b"", stop=lambda: False) -> tuple[bytes | None, bytes]:
    """The first line on ``fd`` (after what ``buf`` already holds) and whatever followed it.

    None when the line does not come within ``timeout_s``, on end of file, or once ``stop()``.
    """
    end = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or stop():
            return None, b""
        try:
            ready = select.select([fd], [], [], min(left, 0.25))[0]
        except InterruptedError:
            continue
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, b""
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return line + b"\n", rest


def _valid_token(token: object) -> bool:
    return isinstance(token, str) and 0 < len(token) <= 256 and all(c in "0123456789abcdefABCDEF" for c in token)


def parse_token_line(line: bytes | None) -> str | None:
    if line is None:
        return None
    word, _, token = line.decode(errors="replace").strip().partition(" ")
    token = token.strip()
    return token if word == protocol.CONTROL_TOKEN and _valid_token(token) else None


# ---- the guard -----------------------------------------------------------------

class Guard:
    def __init__(self, argv: list[str], *, watch_stdin: bool, deferred: bool, token: str | None,
                 early_input: bytes) -> None:
        self.argv = argv
        self.watch_stdin = watch_stdin
        self.deferred = deferred
        self.token = token
        self.buf = early_input
        self.child: subprocess.Popen | None = None
        self.tree: Tree | None = None
        self.pgid: int | None = None
        self.stop_signal: list[int] = []
        self.grace = 1.0
        self.rank = 0
        self.ring = RankStart(is_stopped)  # the gate, the init pipe, the listening watch, the hold
        self.events = False
        self.finished = False
        # --stdin: the write end of the rank's stdin pipe, and what the rank has not read yet.
        self.stdin_w: int | None = None
        self.stdin_pending = bytearray()
        self.stdin_eof = False
        self.stdin_fed = 0  # bytes written into the rank's stdin so far
        self.stdin_told = 0  # ... as last reported to the controller (stdin_read: its flow control)

    # -- events
    def emit(self, kind: str, **fields) -> None:
        if not self.events:
            return
        if self.token is not None:
            fields[protocol.TOKEN_FIELD] = self.token
        try:
            os.write(1, protocol.encode(kind, self.rank, **fields).encode())
        except OSError:
            pass

    # -- the rank's status
    def reap(self) -> None:
        """Collect every exited child: the rank (its status) and re-parented orphans (Linux)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid and self.child.returncode is None:
                self.child.returncode = os.waitstatus_to_exitcode(status)

    def rank_done(self) -> bool:
        if self.child is None:
            return True
        self.reap()
        return self.child.returncode is not None

    # -- signalling everything the rank started
    def signal_all(self, sig: int) -> bool:
        """``sig`` to the rank's group and every member of its tree; whether any live one was there."""
        if self.pgid is None:
            return False
        # Look first: on macOS a daemon whose parent dies of this very signal is re-parented to launchd.
        members = self.tree.members() if self.tree is not None else set()
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in members:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return bool(members)

    def kill_all(self) -> None:
        """SIGKILL until nothing of the rank is left (and every child of ours is reaped). Bounded."""
        for _ in range(KILL_ROUNDS):
            found = self.signal_all(signal.SIGKILL)
            self.reap()
            if not found and self.rank_done():
                return
            time.sleep(0.02)

    def terminate(self) -> None:
        """SIGTERM (and SIGCONT: a held or stopped rank must run to act on it), SIGKILL after the grace."""
        if self.child is None:
            return
        self.signal_all(signal.SIGTERM)
        self.signal_all(signal.SIGCONT)
        end = time.monotonic() + self.grace
        while time.monotonic() < end and not self.rank_done():
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        self.kill_all()

    def close(self) -> None:
        """Nothing the rank started outlives the guard, however the guard's loop ended."""
        if self.finished:
            return
        self.finished = True
        if self.child is None:
            return
        if not self.rank_done():
            self.terminate()
        else:
            self.kill_all()

    # -- start
    def start(self) -> int | None:
        """Start the rank; an exit code if it could not be started (or configured)."""
        env = dict(os.environ)
        cfg_r = cfg_w = None
        ring_fds = self.ring.pipes(env, self.deferred)
        if self.deferred:
            # Started before the controller knew the plan (see orchestrator/launch/prespawn.py):
            # the rank imports MLX now and gets its configuration, relayed by us, later.
            cfg_r, cfg_w = os.pipe()
            env[ENV_CONFIG_FD] = str(cfg_r)
        env.pop(ENV_GUARD_RSS, None)
        stdin_r = None
        if env.pop(protocol.ENV_STDIN, None) == "pipe" and not self.deferred:
            stdin_r, self.stdin_w = os.pipe()
            os.set_blocking(self.stdin_w, False)

        guard_pid = os.getpid()

        def in_child() -> None:  # Linux: the rank dies with its guard, even a SIGKILLed one
            _prctl(_LINUX_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != guard_pid:
                os._exit(1)

        subreaper = _linux() and _prctl(_LINUX_PR_SET_CHILD_SUBREAPER, 1)
        try:
            self.child = subprocess.Popen(
                self.argv,
                env=env,
                start_new_session=True,
                pass_fds=tuple(fd for fd in (*ring_fds, cfg_r) if fd is not None),
                stdin=stdin_r if stdin_r is not None else subprocess.DEVNULL,
                preexec_fn=in_child if _linux() else None,
            )
        except (OSError, subprocess.SubprocessError) as e:
            print(f"orch guard: cannot start {self.argv[0]!r}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 127
        finally:
            for fd in (*ring_fds, cfg_r, stdin_r):
                if fd is not None:
                    os.close(fd)
        self.pgid = self.child.pid
        self.tree = Tree(self.child.pid, subreaper)
        if self.deferred:
            line, self.buf = _read_line(sys.stdin.fileno(), CONFIG_WAIT_S, self.buf, stop=lambda: bool(self.stop_signal))
            config = None
            if line is not None:
                try:
                    config = json.loads(line)
                except ValueError:
                    config = None
            if not isinstance(config, dict) or not isinstance(config.get("env"), dict):
                if line is not None:
                    print("orch guard: the configuration line is not a JSON object with \"env\"", file=sys.stderr)
                return 1  # the controller gave up (or died) before configuring us; close() stops the rank
            token = config.pop(protocol.TOKEN_FIELD, None)
            if token is not None:
                if not _valid_token(token):
                    print("orch guard: the configuration's \"token\" is not a hex string", file=sys.stderr)
                    return 1
                self.token = self.token or token
            os.environ.update({str(k): str(v) for k, v in config["env"].items()})
            # The rank gets its configuration without the token.
            os.write(cfg_w, json.dumps(config).encode() + b"\n")
            os.close(cfg_w)
            if os.environ.get(protocol.ENV_GATED) != "1":
                self.open_gate()
        return None

    def open_gate(self) -> None:
        self.ring.open_gate()

    # -- the loop
    def run(self) -> int | None:
        """Start and watch the rank; its status (Popen's returncode), or an exit code of ours."""
        # Wake the selector on SIGCHLD and on stop signals.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, lambda signum, _frame: self.stop_signal.append(signum))
        signal.signal(signal.SIGCHLD, lambda *_: None)
        if _linux():
            # The token is in our memory and stdin; a same-user rank must not read them via /proc.
            _prctl(_LINUX_PR_SET_DUMPABLE, 0)

        failed = self.start()
        if failed is not None:
            return failed
        self.grace = float(os.environ.get(protocol.ENV_GRACE_S, "1.0"))
        self.rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
        self.events = os.environ.get(protocol.ENV_EVENTS) == "1"
        rss = self.events and os.environ.get(ENV_GUARD_RSS) == "1"
        self.ring.configure(os.environ)
        if os.environ.get(protocol.ENV_BIND):
            bind_cpus(self.child.pid, os.environ[protocol.ENV_BIND])
        self.emit("spawned", pid=self.child.pid, host=socket.gethostname())

        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        if self.ring.init_r is not None:
            sel.register(self.ring.init_r, selectors.EVENT_READ, "init")
        # A --no-stdin guard still reads its stdin when it feeds the rank's (only stdin lines count).
        stdin_fd = sys.stdin.fileno() if sys.stdin is not None and (self.watch_stdin or self.stdin_w is not None) else None
        if stdin_fd is not None:
            try:
                sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
                os.set_blocking(stdin_fd, False)
            except (OSError, ValueError):
                # Not a pipe or socket (e.g. /dev/null): nobody can talk to us there,
                # so behave as with --no-stdin and watch our parent instead.
                stdin_fd = None
                self.watch_stdin = False
                self.stdin_eof = True  # and the rank's input ends at once
        if stdin_fd is None:
            self.stdin_eof = True  # nothing can ever feed the rank's input (e.g. no stdin at all)

        parent = os.getppid()
        now = time.monotonic()
        next_parent = now + PARENT_EVERY_S
        next_tree = now + TREE_EVERY_S if not self.tree.subreaper else None
        next_rss = now if rss else None

        while True:
            if self.rank_done():
                break
            now = time.monotonic()
            # Control lines.
            while b"\n" in self.buf:
                cmd, self.buf = self.buf.split(b"\n", 1)
                if self.take_stdin_line(cmd) or not self.watch_stdin:
                    continue  # a --no-stdin guard's stdin carries only the rank's input
                word = cmd.strip().decode(errors="replace")
                if word == protocol.CONTROL_RELEASE:
                    self.ring.release(self.child.pid)
                elif word == protocol.CONTROL_GO:
                    self.open_gate()
                elif word == protocol.CONTROL_DUMP:  # Python stacks to the rank's stderr (faulthandler)
                    self.dump()
            self.feed_rank(sel)
            if not self.watch_stdin and now >= next_parent:
                next_parent = now + PARENT_EVERY_S
                if os.getppid() != parent:
                    self.stop_signal.append(0)
            if self.stop_signal:
                self.terminate()  # TERM, grace, KILL; the rank's status is mirrored below
                break
            deadlines = [next_parent] if not self.watch_stdin else []
            # The ring start: a bounded hold, and the listening watch from the init byte on.
            deadlines += self.ring.tick(now, self.child.pid, self.emit)
            if next_tree is not None:
                if now >= next_tree:
                    self.tree.members()
                    next_tree = time.monotonic() + TREE_EVERY_S
                deadlines.append(next_tree)
            if next_rss is not None:
                if now >= next_rss:
                    self.sample_rss()
                    next_rss = time.monotonic() + RSS_EVERY_S
                deadlines.append(next_rss)
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in sel.select(timeout):
                if key.data == "wake":
                    try:
                        while wake_r.recv(512):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                elif key.data == "init":
                    try:
                        got = os.read(self.ring.init_r, 64)
                    except (BlockingIOError, InterruptedError):
                        continue
                    sel.unregister(self.ring.init_r)
                    os.close(self.ring.init_r)
                    self.ring.init_r = None
                    self.ring.on_init(got, time.monotonic())  # EOF without a byte: this rank will not init
                elif key.data == "feed":
                    self.feed_rank(sel)
                else:
                    try:
                        chunk = os.read(stdin_fd, 65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not chunk:
                        sel.unregister(stdin_fd)
                        if self.watch_stdin:
                            self.stop_signal.append(0)
                        else:  # mpirun's forwarded stdin ended: so does the rank's input, nothing else
                            self.stdin_eof = True
                        continue
                    self.buf += chunk

        # The rank is gone; nothing it started may outlive it.
        self.kill_all()
        self.finished = self.rank_done()
        status = self.child.returncode
        code, sig = (None, -status) if status is not None and status < 0 else (status, None)
        self.emit("exited", code=code, signal=sig)
        return status

    def take_stdin_line(self, cmd: bytes) -> bool:
        """``stdin <base64>`` / ``stdin-eof`` (``orch run --stdin``): True if ``cmd`` was one.

        Bytes arriving when the rank has no stdin pipe, or after its input ended,
        are dropped; a line that is not valid base64 is dropped too.
        """
        word, _, data = cmd.strip().partition(b" ")
        if word == protocol.CONTROL_STDIN_EOF.encode():
            self.stdin_eof = True
            return True
        if word != protocol.CONTROL_STDIN.encode():
            return False
        if self.stdin_w is not None and not self.stdin_eof:
            try:
                self.stdin_pending += binascii.a2b_base64(data)
            except (binascii.Error, ValueError):
                pass
        return True

    def feed_rank(self, sel: selectors.BaseSelector) -> None:
        """Write what the rank has not read yet, without blocking; close its stdin after ``stdin-eof``.

        Registered for writing only while something waits, so the loop sleeps
        when the rank is not reading. EPIPE (the rank closed its stdin or is
        gone) drops the rest.
        """
        if self.stdin_w is None:
            return
        while self.stdin_pending:
            try:
                n = os.write(self.stdin_w, self.stdin_pending[:65536])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.stdin_pending.clear()
                self.stdin_eof = True
                break
            del self.stdin_pending[:n]
            self.stdin_fed += n
        if self.stdin_fed - self.stdin_told >= protocol.STDIN_ACK_EVERY:  # (the window is 16 of these)
            self.stdin_told = self.stdin_fed
            self.emit("stdin_read", bytes=self.stdin_fed, closed=False)
        registered = self.stdin_w in sel.get_map()
        if self.stdin_eof and not self.stdin_pending:
            if registered:
                sel.unregister(self.stdin_w)
            os.close(self.stdin_w)
            self.stdin_w = None
            self.emit("stdin_read", bytes=self.stdin_fed, closed=True)  # the controller stops waiting for us
        elif self.stdin_pending and not registered:
            sel.register(self.stdin_w, selectors.EVENT_WRITE, "feed")
        elif not self.stdin_pending and registered:
            sel.unregister(self.stdin_w)

    def sample_rss(self) -> None:
        """Memory, CPU time and run state of the rank (one ``rss`` event): what we can see of any program.

        CPU time is the whole tree's, so a rank whose work runs in a child (a
        shell script, a data loader) still shows progress; the controller's
        idle-hang watchdog reads it for programs that report no steps.
        """
        pid = self.child.pid
        members = sorted(self.tree.members() | {pid})
        if _linux():
            sizes = rss_bytes(members)
            cpu = cpu_seconds(members) if pid in sizes else {}
            stopped = is_stopped(pid)
        else:  # one ps for all three (each ps costs 5-10 ms)
            sizes, cpu, stopped_pids = ps_sample(members)
            stopped = pid in stopped_pids
        if pid not in sizes:
            return
        self.emit("rss", rss_bytes=sizes[pid], tree_rss_bytes=sum(sizes.values()),
                  system_available_bytes=system_available_bytes(),
                  cpu_s=round(sum(cpu.values()), 3) if pid in cpu else None, stopped=stopped)

    def dump(self) -> None:
        """Ask the rank for its Python stacks, and tell the controller whether it can answer.

        A stopped process (SIGSTOP, Ctrl-Z, a tracer) runs no signal handler, so
        faulthandler cannot write its stacks: the controller hears "stopped"
        instead of waiting for nothing, and the diagnosis says so. The signal is
        not sent then: it would stay pending and dump whenever the rank is
        resumed, long after the diagnosis.
        """
        pid = self.child.pid
        stopped = is_stopped(pid)
        signalled = False
        if not stopped:
            try:
                os.kill(pid, getattr(signal, protocol.DUMP_SIGNAL_NAME))
                signalled = True
            except (ProcessLookupError, PermissionError, AttributeError):
                pass
        self.emit("dump", signalled=signalled, stopped=stopped)


def _mirror(status: int | None) -> int:
    """Exit the way the rank did: its code, or the same signal re-raised."""
    if status is not None and status < 0:
        sig = -status
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL/SIGSTOP cannot be caught anyway
            pass
        signal.set_wakeup_fd(-1)
        sys.stdout.flush()
        os.kill(os.getpid(), sig)
        time.sleep(1)  # the signal is delivered before this returns
        return 128 + sig
    return status or 0


USAGE = "usage: python -S -m orchestrator.runtime.guard [--no-stdin] [--deferred] [--token-line] -- CMD ARGS..."


def main(argv: list[str]) -> int:
    flags = {"--no-stdin": False, "--deferred": False, "--token-line": False}
    while argv and argv[0] in flags:
        flags[argv[0]] = True
        argv = argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    token = None
    early = b""
    if flags["--token-line"]:
        # Before the rank exists, so it can never see this line.
        line, early = _read_line(sys.stdin.fileno(), TOKEN_WAIT_S)
        token = parse_token_line(line)
        if token is None:
            print(f"orch guard: --token-line: expected a first stdin line '{protocol.CONTROL_TOKEN} <hex>'"
                  f"{' within %d s' % TOKEN_WAIT_S if line is None else ''}; not starting {argv[0]!r}",
                  file=sys.stderr)
            return 1
    guard = Guard(argv, watch_stdin=not flags["--no-stdin"], deferred=flags["--deferred"], token=token,
                  early_input=early)
    try:
        status = guard.run()
    finally:
        guard.close()
    return _mirror(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
