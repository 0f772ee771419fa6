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

The rest lives in one module per concept, each imported here the way
``orchestrator.protocol`` is: ``runtime/proctree.py`` (the subreaper, the
process tree, killing it, CPU binding), ``runtime/rank_sampling.py`` (rss,
CPU time, stopped; ``/proc`` or ``ps``), ``runtime/control_channel.py`` (stdin
lines: token, configuration, ``--stdin`` framing and flow control).

Only the standard library, on every platform branch, here and in those
modules: this runs as ``python -S`` (no site-packages) before every rank and
must be fast.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

from orchestrator import protocol
# Stdlib-only siblings, imported under -S like protocol (orchestrator.runtime's __init__ imports nothing heavy).
from orchestrator.runtime import proctree, rank_sampling
from orchestrator.runtime.control_channel import RankInput, parse_config_line, parse_token_line, read_line
from orchestrator.runtime.hard_exit import hard_exit
from orchestrator.runtime.proctree import TREE_EVERY_S, Tree
from orchestrator.runtime.rank_sampling import RSS_EVERY_S, is_stopped
# The ring start's half in the rank (gate, init byte, listening watch, hold).
from orchestrator.runtime.ringstart import RankStart

# The environment variables the guard reads and sets are named in protocol.py.
ENV_INIT_FD = protocol.ENV_INIT_FD
ENV_GATE_FD = protocol.ENV_GATE_FD
ENV_CONFIG_FD = protocol.ENV_CONFIG_FD
ENV_GUARD_RSS = protocol.ENV_GUARD_RSS
ENV_HOLD_MAX_S = protocol.ENV_HOLD_MAX_S

HOLD_MAX_S = protocol.HOLD_MAX_S
TOKEN_WAIT_S = protocol.TOKEN_WAIT_S
CONFIG_WAIT_S = protocol.CONFIG_WAIT_S
PARENT_EVERY_S = 0.5


class Guard:
    def __init__(self, argv: list[str], *, watch_stdin: bool, deferred: bool, token: str | None,
                 early_input: bytes) -> None:
        self.argv = argv
        self.watch_stdin = watch_stdin
        self.deferred = deferred
        self.token = token
        self.buf = early_input
        self.child: subprocess.Popen | None = None
        self.max_rss_bytes: int | None = None  # the rank's peak, from the kernel once it is reaped
        self.tree: Tree | None = None
        self.stop_signal: list[int] = []
        self.grace = 1.0
        self.rank = 0
        self.ring = RankStart(is_stopped)  # the gate, the init pipe, the listening watch, the hold
        self.events = False
        self.finished = False
        self.input = RankInput(None, self.emit)  # --stdin: the rank's stdin pipe (set up in start)

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
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid and self.child.returncode is None:
                self.child.returncode = os.waitstatus_to_exitcode(status)
                self.max_rss_bytes = rank_sampling.maxrss_bytes(usage.ru_maxrss)

    def rank_done(self) -> bool:
        if self.child is None:
            return True
        self.reap()
        return self.child.returncode is not None

    # -- stopping everything the rank started (runtime/proctree.py)
    def kill_all(self) -> None:
        """SIGKILL until nothing of the rank is left (and every child of ours is reaped). Bounded."""
        if self.tree is None:
            self.reap()
            return
        self.tree.kill(self.rank_done)

    def terminate(self) -> None:
        """SIGTERM (and SIGCONT), SIGKILL after the grace."""
        if self.child is None or self.tree is None:
            return
        self.tree.terminate(self.grace, self.rank_done)

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
            stdin_r, stdin_w = os.pipe()
            os.set_blocking(stdin_w, False)
            self.input.write_fd = stdin_w

        subreaper = proctree.become_subreaper()
        try:
            self.child = subprocess.Popen(
                self.argv,
                env=env,
                start_new_session=True,
                pass_fds=tuple(fd for fd in (*ring_fds, cfg_r) if fd is not None),
                stdin=stdin_r if stdin_r is not None else subprocess.DEVNULL,
                preexec_fn=proctree.die_with_parent(),  # Linux: the rank dies with its guard, even a SIGKILLed one
            )
        except (OSError, subprocess.SubprocessError) as e:
            print(f"orch guard: cannot start {self.argv[0]!r}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 127
        finally:
            for fd in (*ring_fds, cfg_r, stdin_r):
                if fd is not None:
                    os.close(fd)
        self.tree = Tree(self.child.pid, subreaper)
        if self.deferred:
            line, self.buf = read_line(sys.stdin.fileno(), CONFIG_WAIT_S, self.buf, stop=lambda: bool(self.stop_signal))
            config, token, problem = parse_config_line(line)
            if config is None:
                if problem is not None:
                    print(f"orch guard: {problem}", file=sys.stderr)
                return 1  # the controller gave up (or died) before configuring us; close() stops the rank
            if token is not None:
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
        # The token is in our memory and stdin; a same-user rank must not read them via /proc.
        proctree.not_dumpable()

        failed = self.start()
        if failed is not None:
            return failed
        self.grace = float(os.environ.get(protocol.ENV_GRACE_S, "1.0"))
        self.rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
        self.events = os.environ.get(protocol.ENV_EVENTS) == "1"
        rss = self.events and os.environ.get(ENV_GUARD_RSS) == "1"
        self.ring.configure(os.environ)
        if os.environ.get(protocol.ENV_BIND):
            proctree.bind_cpus(self.child.pid, os.environ[protocol.ENV_BIND])
        self.emit("spawned", pid=self.child.pid, host=socket.gethostname())

        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        if self.ring.init_r is not None:
            sel.register(self.ring.init_r, selectors.EVENT_READ, "init")
        # A --no-stdin guard still reads its stdin when it feeds the rank's (only stdin lines count).
        feeding = self.input.write_fd is not None
        stdin_fd = sys.stdin.fileno() if sys.stdin is not None and (self.watch_stdin or feeding) else None
        if stdin_fd is not None:
            try:
                sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
                os.set_blocking(stdin_fd, False)
            except (OSError, ValueError):
                # Not a pipe or socket (e.g. /dev/null): nobody can talk to us there,
                # so behave as with --no-stdin and watch our parent instead.
                stdin_fd = None
                self.watch_stdin = False
                self.input.eof = True  # and the rank's input ends at once
        if stdin_fd is None:
            self.input.eof = True  # nothing can ever feed the rank's input (e.g. no stdin at all)

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
                if self.input.take_line(cmd) or not self.watch_stdin:
                    continue  # a --no-stdin guard's stdin carries only the rank's input
                word = cmd.strip().decode(errors="replace")
                if word == protocol.CONTROL_RELEASE:
                    self.ring.release(self.child.pid)
                elif word == protocol.CONTROL_GO:
                    self.open_gate()
                elif word == protocol.CONTROL_DUMP:  # Python stacks to the rank's stderr (faulthandler)
                    self.dump()
            self.input.feed(sel)
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
                    self.input.feed(sel)
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
                            self.input.eof = True
                        continue
                    self.buf += chunk

        # The rank is gone; nothing it started may outlive it.
        self.kill_all()
        self.finished = self.rank_done()
        status = self.child.returncode
        code, sig = (None, -status) if status is not None and status < 0 else (status, None)
        peak = {} if self.max_rss_bytes is None else {"max_rss_bytes": self.max_rss_bytes}
        self.emit("exited", code=code, signal=sig, **peak)
        return status

    def sample_rss(self) -> None:
        """Memory, CPU time and run state of the rank and its tree (one ``rss`` event): runtime/rank_sampling.py."""
        fields = rank_sampling.sample(self.child.pid, self.tree.members())
        if fields is not None:
            self.emit("rss", **fields)

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
        line, early = read_line(sys.stdin.fileno(), TOKEN_WAIT_S)
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
    hard_exit(main(sys.argv[1:]))  # the rank is reaped: skip the interpreter's teardown (runtime/hard_exit.py)
