"""The rank guard: the parent of every rank, local or remote.

``python -m orchestrator.runtime.guard [--no-stdin] -- CMD ARGS...``

Why it exists: a launcher cannot reliably kill a remote rank. sshd running
as root ignores SSH "signal" requests, and closing a channel without a pty
leaves the remote process running; locally a controller killed with SIGKILL
cannot clean up at all. So the guard

* starts CMD in a new session (its own process group, so grandchildren such
  as data-loader workers are reached by one ``killpg``);
* tells the controller the rank's pid with a ``spawned`` event, and with a
  ``listening`` event when the rank's ring socket (``ORCH_LISTEN``) is bound —
  polled every 5 ms, because MLX holds the GIL inside ``init`` so the rank
  itself cannot say so;
* reads control lines on its stdin: ``go`` opens the rank's start gate (a pipe
  whose read end the rank gets as ``ORCH_GATE_FD``);
* treats end-of-file on stdin (the controller closed it, died, or the SSH
  connection dropped) and SIGTERM/SIGHUP/SIGINT as "stop": SIGTERM to the
  rank's group, SIGKILL after ``ORCH_GRACE_S`` (default 1 s);
* when the rank exits, kills what is left of its group and exits the same
  way the rank did (same code, or re-raises the same signal), so the
  controller sees the rank's own status.

``--no-stdin`` is for launchers that give ranks no stdin (mpirun forwards
stdin to rank 0 only): then signals stop the rank, and so does the death of
the guard's parent (checked every 0.5 s), so a SIGKILLed mpirun leaves no rank.

Only the standard library: this starts before every rank and must be fast.
"""

from __future__ import annotations

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


HOLD_MAX_S = 10.0


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def is_listening(pid: int, port: int) -> bool:
    """Whether a socket on this machine listens on ``port`` (the plan chose it free, so it is the rank's)."""
    if sys.platform.startswith("linux"):
        suffix = f":{port:04X}"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        parts = line.split()
                        if parts[1].endswith(suffix) and parts[3] == "0A":
                            return True
            except (OSError, StopIteration):
                continue
        return False
    import psutil  # macOS: own child's sockets need no privileges

    try:
        conns = psutil.Process(pid).net_connections("tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


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


def _read_config(fd: int, timeout_s: float) -> tuple[bytes | None, bytes]:
    """The first line on ``fd`` (a --deferred rank's configuration) and whatever followed it."""
    buf = b""
    end = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None, b""
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, b""
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return line + b"\n", rest


def main(argv: list[str]) -> int:
    watch_stdin = True
    deferred = False
    while argv and argv[0] in ("--no-stdin", "--deferred"):
        watch_stdin = watch_stdin and argv[0] != "--no-stdin"
        deferred = deferred or argv[0] == "--deferred"
        argv = argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m orchestrator.runtime.guard [--no-stdin] [--deferred] -- CMD ARGS...", file=sys.stderr)
        return 2

    gate_r = gate_w = cfg_r = cfg_w = None
    env = dict(os.environ)
    if env.pop("ORCH_GATED", None) == "1" or deferred:
        gate_r, gate_w = os.pipe()
        env["ORCH_GATE_FD"] = str(gate_r)
    if deferred:
        # Started before the controller knew the plan (see orchestrator/launch/prespawn.py):
        # the rank imports MLX now and gets its configuration, relayed by us, later.
        cfg_r, cfg_w = os.pipe()
        env["ORCH_CONFIG_FD"] = str(cfg_r)

    # Wake the selector on SIGCHLD and on stop signals.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    stop_signal: list[int] = []

    def on_stop(signum, _frame):
        stop_signal.append(signum)

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_stop)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    try:
        child = subprocess.Popen(
            argv,
            env=env,
            start_new_session=True,
            pass_fds=tuple(fd for fd in (gate_r, cfg_r) if fd is not None),
            stdin=subprocess.DEVNULL,
        )
    except OSError as e:
        print(f"orch guard: cannot start {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    for fd in (gate_r, cfg_r):
        if fd is not None:
            os.close(fd)
    early_input = b""
    if deferred:
        line, early_input = _read_config(sys.stdin.fileno(), 600.0)
        if line is None:  # the controller gave up (or died) before configuring us
            _killpg(child.pid, signal.SIGKILL)
            child.wait()
            return 1
        os.environ.update(json.loads(line)["env"])
        os.write(cfg_w, line)
        os.close(cfg_w)
        if os.environ.get("ORCH_GATED") != "1":
            os.write(gate_w, b"go\n")
            os.close(gate_w)
            gate_w = None
    grace = float(os.environ.get("ORCH_GRACE_S", "1.0"))
    rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    if os.environ.get("ORCH_BIND"):
        bind_cpus(child.pid, os.environ["ORCH_BIND"])
    pgid = child.pid
    if os.environ.get("ORCH_EVENTS") == "1":
        line = protocol.encode("spawned", rank, pid=child.pid, host=socket.gethostname())
        os.write(1, line.encode())

    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ)
    stdin_fd = sys.stdin.fileno() if watch_stdin else None
    if stdin_fd is not None:
        try:
            sel.register(stdin_fd, selectors.EVENT_READ)
            os.set_blocking(stdin_fd, False)
        except (OSError, ValueError):
            # Not a pipe or socket (e.g. /dev/null): nobody can talk to us there,
            # so behave as with --no-stdin and watch our parent instead.
            stdin_fd = None
            watch_stdin = False
    buf = early_input
    stopping_since = None
    # Watch for the rank's ring socket to listen, so the controller can open the
    # gate of the rank that connects first. Bounded: 5 ms steps for 120 s.
    listen = os.environ.get("ORCH_LISTEN")
    listen_port = int(listen.rpartition(":")[2]) if listen else None
    listen_deadline = time.monotonic() + 120.0
    parent = os.getppid()
    # Rank 0 is *held* (SIGSTOPped inside accept) once it listens, until the
    # rank that connects first is itself listening: see orchestrator/plan.py.
    hold = os.environ.get("ORCH_HOLD") == "1"
    held_since = None

    while True:
        status = child.poll()
        if status is not None:
            break
        while b"\n" in buf:
            cmd, buf = buf.split(b"\n", 1)
            word = cmd.strip().decode()
            if word == protocol.CONTROL_RELEASE and held_since is not None:
                os.kill(child.pid, signal.SIGCONT)
                held_since = None
            if word == protocol.CONTROL_GO and gate_w is not None:
                try:
                    os.write(gate_w, b"go\n")
                    os.close(gate_w)
                except OSError:
                    pass
                gate_w = None
        if stop_signal and stopping_since is None:
            stopping_since = time.monotonic()
            _killpg(pgid, signal.SIGTERM)
            _killpg(pgid, signal.SIGCONT)  # a stopped rank must run to act on TERM
        timeout = None if watch_stdin else 0.5
        if not watch_stdin and os.getppid() != parent and stopping_since is None:
            stop_signal.append(0)
            continue
        if held_since is not None:
            left = held_since + HOLD_MAX_S - time.monotonic()
            if left <= 0:  # the release never came: let MLX's own retries take over
                os.kill(child.pid, signal.SIGCONT)
                held_since = None
            else:
                timeout = left if timeout is None else min(timeout, left)
        if listen_port is not None:
            if is_listening(child.pid, listen_port):
                if hold:
                    os.kill(child.pid, signal.SIGSTOP)
                    held_since = time.monotonic()
                if os.environ.get("ORCH_EVENTS") == "1":
                    os.write(1, protocol.encode("listening", rank, address=listen).encode())
                listen_port = None
            elif time.monotonic() > listen_deadline:
                listen_port = None
            else:
                timeout = 0.005
        if stopping_since is not None:
            left = stopping_since + grace - time.monotonic()
            if left <= 0:
                _killpg(pgid, signal.SIGKILL)
                child.wait()
                break
            timeout = left if timeout is None else min(timeout, left)
        if listen_port is not None:
            timeout = 0.005 if timeout is None else min(timeout, 0.005)
        for key, _ in sel.select(timeout):
            if key.fileobj is wake_r:
                try:
                    while wake_r.recv(512):
                        pass
                except BlockingIOError:
                    pass
                continue
            try:
                chunk = os.read(stdin_fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(stdin_fd)
                stop_signal.append(0)
                continue
            buf += chunk

    status = child.returncode
    # The rank is gone; nothing it started may outlive it.
    if _group_alive(pgid):
        _killpg(pgid, signal.SIGKILL)
    if os.environ.get("ORCH_EVENTS") == "1":
        code, sig = (None, -status) if status is not None and status < 0 else (status, None)
        try:
            os.write(1, protocol.encode("exited", rank, code=code, signal=sig).encode())
        except OSError:
            pass
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
