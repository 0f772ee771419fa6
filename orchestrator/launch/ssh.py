"""Ranks on remote hosts, over one asyncssh connection per host.

``prepare`` works per host as a pipeline, all hosts at once: connect (a
failure names every host that could not be reached, and why, in one line),
open one SSH session per rank, and stage the runtime and the script's
directory over SFTP (``staging.py``: content-addressed, so an unchanged
second run uploads nothing). Each session runs::

    read -r orch_go && cd DIR && exec env K=V ... PYTHON -m orchestrator.runtime.guard --token-line -- \
        PYTHON -m orchestrator.runtime.bootstrap SCRIPT ARGS

built only from ``shlex.quote``'d pieces: the remote login shell (and its rc
files, ~0.4 s with pyenv in bash's .bashrc) starts while we stage, then waits
for one line that ``start`` sends. If the launch fails first, the sessions are
closed and the shells exit at ``read`` without starting anything. Right after
the release line ``start`` sends the guard's ``token <hex>`` line (fresh per
rank and attempt, never on a command line): only events carrying it are the
guard's, so only its ``spawned`` pid is ever signalled (``kill_group_command``).

No pty: the guard is what stops a rank, because sshd does not signal a command
when its session ends. The guard stops the rank's process group when its
stdin reaches end-of-file, which happens when ``stop()`` sends EOF, when
``kill()`` closes the session, when this controller dies (the kernel closes
its TCP connection and sshd closes the sessions), and when the controller's
host vanishes (sshd's ``ClientAliveInterval`` notices).

In the other direction, keepalives (``keepalive_s`` x 3) notice a host that
vanished; every rank on it then ends with exit code 255 and a reason naming
the host. ``aclose`` collects results (``collect.py``) from every host still
reachable, retires the run's remote directories (a rename; a later run
deletes them in the background), and closes the connections.

Host keys are always verified against known_hosts; ``ssh_accept_new`` is
OpenSSH's ``StrictHostKeyChecking=accept-new``: unknown keys are trusted and
recorded, changed keys are refused.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import secrets
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import asyncssh

from orchestrator import collect, staging
from orchestrator.plan import FILE_NAMES, file_name
from orchestrator.launch.base import (
    TOKEN_LINE_FLAG,
    ExitStatus,
    LaunchError,
    Launcher,
    RankHandle,
    RankSpec,
    new_token,
    token_line,
)

REMOTE_BASE = ".cache/mlx-orch"  # under the remote user's home
DEFAULT_PYTHON = "python3"
KEEPALIVE_COUNT_MAX = 3
LOST_EXIT_CODE = 255  # what ssh(1) exits with when the connection fails
TRASH_PREFIX = ".trash-"  # runs/.trash-<run-id>-h<i>: collected, retired, deleted by a later run
PURGE_DELAY_S = 0.0  # the purge starts with the ranks: remote I/O while their login shells start
PURGE_WAIT_S = 2.0  # at the end, how long an unfinished purge may still run
RELEASE = b"start\n"  # the line a pre-opened session waits for before it execs the guard
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------- pure helpers


def staged_files(spec: RankSpec) -> dict[str, str]:
    """``{env var: local path}``: the per-job files (``plan.write_files``, e.g. ``MLX_IBV_DEVICES``) this rank's
    environment names, which must exist on its host. ``prepare`` copies each into the host's remote run
    directory under the same name and ``remote_env`` points the variable there. ``MLX_HOSTFILE`` is not
    among them: its content travels in ``ORCH_MLX_HOSTFILE_JSON`` and the bootstrap writes it."""
    return {var: spec.env[var] for var in FILE_NAMES if var != "MLX_HOSTFILE" and spec.env.get(var)}


def remote_env(spec: RankSpec, *, run_dir: str, pythonpath: str, files_dir: Optional[str] = None) -> dict[str, str]:
    """Exactly what the rank gets on top of the remote login environment: ``spec.env``, adapted to the host.

    ``files_dir``: where ``prepare`` staged the ``staged_files`` on that host (default ``run_dir``).
    """
    env = dict(spec.env)
    env.pop("MLX_HOSTFILE", None)  # a local path; the bootstrap writes the remote copy
    if spec.mlx_hostfile_json is not None:
        env["ORCH_MLX_HOSTFILE_JSON"] = spec.mlx_hostfile_json
    for var in staged_files(spec):  # a local path too: the staged copy on that host instead
        env[var] = f"{(files_dir or run_dir).rstrip('/')}/{file_name(var)}"
    env["ORCH_RUN_DIR"] = run_dir
    env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def build_command(argv: list[str], env: dict[str, str], cwd: str) -> str:
    """The remote shell line: ``cd CWD && exec env K=V ... ARGV``, every piece ``shlex.quote``'d."""
    for key in env:
        if not _ENV_KEY.match(key):
            raise LaunchError(f"environment variable name {key!r} cannot be passed to a remote host")
    parts = ["cd", shlex.quote(cwd), "&&", "exec", "env"]
    parts += [shlex.quote(f"{k}={v}") for k, v in env.items()]
    parts += [shlex.quote(a) for a in argv]
    return " ".join(parts)


UNKNOWN_SIGNAL = 99  # the number for a signal name this platform does not have (its words stay readable)
_RFC4254_SIGNALS = {"ABRT": 6, "ALRM": 14, "FPE": 8, "HUP": 1, "ILL": 4, "INT": 2, "KILL": 9, "PIPE": 13,
                    "QUIT": 3, "SEGV": 11, "TERM": 15, "USR1": 10, "USR2": 12}


def signal_number(name: str) -> int:
    """SSH exit-signal name ("KILL", "TERM", ...) to this platform's number; ``UNKNOWN_SIGNAL`` if it has none.

    OpenSSH names only the signals of RFC 4254 and reports every other one
    (SIGTRAP, SIGBUS, ...) as "SIG@openssh.com"; such a number must never be
    fed to ``signal.Signals`` (``base.signal_name`` words any number).
    """
    bare = str(name).upper().removeprefix("SIG")
    try:
        return int(signal.Signals["SIG" + bare])
    except KeyError:
        return _RFC4254_SIGNALS.get(bare, UNKNOWN_SIGNAL)


def exit_signal_status(name: str) -> ExitStatus:
    """The status of a session that ended by the signal SSH reports as ``name``."""
    number = signal_number(name)
    known = number != UNKNOWN_SIGNAL
    return ExitStatus(code=None, signal=number, signal_label=None if known else str(name))


def kill_group_command(pid: int) -> Optional[str]:
    """The remote line that SIGKILLs a rank's process group, or None for a pid that must never be signalled.

    ``pid`` comes only from the guard's authenticated ``spawned`` event. Even
    so, the group is killed only while it is still the guard's: its leader
    leads its own group and its parent runs ``orchestrator.runtime.guard``
    (``ps`` fields that both procps and BSD ps have). A pid of 0 or 1
    (``kill -KILL -1`` as root is every process on the host) is refused outright. No ``--``:
    dash, a common /bin/sh, rejects it.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        return None
    return (f"p={pid}; g=$(ps -o pgid= -p $p 2>/dev/null | tr -d ' '); [ \"$g\" = $p ] || exit 0; "
            f"pp=$(ps -o ppid= -p $p 2>/dev/null | tr -d ' '); [ -n \"$pp\" ] && [ \"$pp\" -gt 1 ] || exit 0; "
            f"ps -o args= -p $pp 2>/dev/null | grep -q orchestrator.runtime.guard && kill -KILL -$p 2>/dev/null; exit 0")


def release_lines(token: str) -> bytes:
    """What ``start`` writes to a waiting session: the shell's release line, then the guard's token line."""
    return RELEASE + (token_line(token) + "\n").encode()


def _address_in(text: str) -> Optional[str]:
    m = re.search(r"\('([^']+)', (\d+)\)", text)
    return f"{m.group(1)}:{m.group(2)}" if m else None


def describe_connect_error(exc: BaseException, *, timeout: float, known_hosts: Optional[str] = None,
                           key_problem: Optional[str] = None, user: Optional[str] = None) -> str:
    """Why a host could not be reached, in words a person can act on (no traceback, no class names if avoidable)."""
    kh = known_hosts or "~/.ssh/known_hosts"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {timeout:g}s (host down, wrong address, or a firewall dropping SSH; see --connect-timeout)"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host name (not in DNS or /etc/hosts, and no HostName for it in the SSH config)"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        if key_problem == "changed":
            return (f"host key CHANGED: the key it presented is not the one recorded in {kh} (possible "
                    "man-in-the-middle; if the host was reinstalled, remove the old entry with ssh-keygen -R)")
        if key_problem == "revoked" or "revoked" in str(exc).lower():
            return f"host key is marked @revoked in {kh}"
        return (f"host key not verifiable: the host is not in {kh}; check its fingerprint and add it "
                "(ssh-keyscan), or pass --ssh-accept-new to trust it on first use")
    if isinstance(exc, asyncssh.PermissionDenied):
        who = f" as {user}" if user else ""
        return f"authentication failed{who}: the server accepted none of the keys offered (give one with -i, or IdentityFile in the SSH config)"
    if isinstance(exc, ConnectionRefusedError):
        where = _address_in(str(exc))
        return f"connection refused{' at ' + where if where else ''} (is sshd running there, on that port?)"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to the host (network unreachable from here)"
    if isinstance(exc, OSError) and "Multiple exceptions" in str(exc):
        if "Connect call failed" in str(exc) and "refused" in str(exc).lower():
            return "connection refused on every address (is sshd running there?)"
    if isinstance(exc, (ConnectionResetError, asyncssh.ConnectionLost, BrokenPipeError)):
        return "the host closed the connection during the SSH handshake"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"SSH handshake failed: {exc.reason}"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file (a known_hosts, config or key file)"
    if isinstance(exc, asyncssh.KeyImportError):
        return f"cannot load a private key: {exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"


def describe_lost(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "the host closed it"
    text = str(exc)
    if "keepalive" in text.lower():
        return "no answer to keepalives"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "connection reset"
    return text or type(exc).__name__


# ----------------------------------------------------------------------------- one connection per host


@dataclass
class _Link:
    """The one SSH connection to one machine (all its ranks, staging and collection share it)."""

    name: str
    user: Optional[str]
    port: Optional[int]
    conn: Optional[asyncssh.SSHClientConnection] = None
    sftp: Optional[asyncssh.SFTPClient] = None
    home: Optional[str] = None
    stager: Optional[staging.RemoteStager] = None
    runtime_dir: Optional[str] = None
    lost_exc: Optional[BaseException] = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    key_problem: Optional[str] = None
    new_key: Optional[tuple] = None
    stats: staging.StageStats = field(default_factory=staging.StageStats)
    pending: dict = field(default_factory=dict)  # rank -> session opened in prepare, not yet released

    @property
    def alive(self) -> bool:
        return self.conn is not None and not self.lost.is_set()

    @property
    def lost_reason(self) -> str:
        return f"lost the SSH connection to {self.name} ({describe_lost(self.lost_exc)})"


class _ConnectFailed(Exception):
    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


class _Client(asyncssh.SSHClient):
    def __init__(self, link: _Link, accept_new: bool):
        self._link = link
        self._accept_new = accept_new
        self._conn = None

    def connection_made(self, conn) -> None:
        self._conn = conn

    def connection_lost(self, exc: Optional[Exception]) -> None:
        link = self._link
        if link.conn is not None and not link.closing and not link.lost.is_set():
            link.lost_exc = exc
            link.lost.set()

    def validate_host_public_key(self, host: str, addr: str, port: int, key) -> bool:
        # Called only when the key is not among those known_hosts trusts for this host.
        trusted = getattr(self._conn, "_trusted_host_keys", None)
        if trusted:  # the host is known, with another key
            self._link.key_problem = "changed"
            return False
        self._link.key_problem = "unknown"
        if self._accept_new:
            self._link.new_key = (host, addr, port, key)
            return True
        return False


@dataclass
class _Site:
    """One hostfile entry (host index) on a link: its own run directory, even on a shared filesystem."""

    index: int
    link: _Link
    label: str                      # safe local name for hosts/<label>/
    stage_code: bool
    run_root: Optional[str] = None  # BASE/runs/<run-id>-h<i>
    code_dir: Optional[str] = None
    run_dir: Optional[str] = None


class _Lines:
    """An SSH stream with ``readline``/``read`` that end (b"") instead of raising when the connection goes."""

    def __init__(self, reader):
        self._reader = reader

    async def readline(self) -> bytes:
        try:
            return await self._reader.readline()
        except (asyncssh.Error, OSError, asyncio.IncompleteReadError, EOFError):
            return b""

    async def read(self, n: int = -1) -> bytes:
        try:
            return await self._reader.read(n)
        except (asyncssh.Error, OSError, asyncio.IncompleteReadError, EOFError):
            return b""


class SSHRank(RankHandle):
    def __init__(self, spec: RankSpec, link: _Link, proc: asyncssh.SSHClientProcess, launcher: "SSHLauncher"):
        self.rank = spec.rank
        self.host = spec.host
        self.link = link
        self.proc = proc
        self._launcher = launcher
        self.stdout = _Lines(proc.stdout)
        self.stderr = _Lines(proc.stderr)
        self.rank_pid = None

    def send(self, line: str) -> None:
        try:
            if not self.proc.stdin.is_closing():
                self.proc.stdin.write((line + "\n").encode())
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass

    def stop(self) -> None:
        """EOF on the guard's stdin: it stops the rank's process group (SIGTERM, SIGKILL after the grace)."""
        try:
            self.proc.stdin.write_eof()
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass

    def kill(self) -> None:
        """Close the session (the guard sees EOF) and SIGKILL the rank's group through the connection."""
        try:
            self.proc.close()
        except (asyncssh.Error, OSError):
            pass
        command = kill_group_command(self.rank_pid) if self.token else None
        if command and self.link.alive:
            self._launcher._background(self.link.conn.run(command, check=False))

    async def wait(self) -> ExitStatus:
        closed = asyncio.ensure_future(self.proc.wait_closed())
        lost = asyncio.ensure_future(self.link.lost.wait())
        try:
            await asyncio.wait({closed, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (closed, lost):
                if not t.done():
                    t.cancel()
        sig = self.proc.exit_signal
        if sig:
            return exit_signal_status(sig[0])
        code = self.proc.exit_status
        if code is not None and code >= 0:
            return ExitStatus(code=code, signal=None)
        if self.link.lost.is_set():
            return ExitStatus(code=LOST_EXIT_CODE, signal=None, reason=self.link.lost_reason)
        return ExitStatus(code=LOST_EXIT_CODE, signal=None,
                          reason=f"the SSH session on {self.link.name} closed without an exit status")


# ----------------------------------------------------------------------------- the launcher


class SSHLauncher(Launcher):
    name = "ssh"

    def __init__(self, hostfile, req):
        self.hostfile = hostfile
        self.req = req
        self._links: dict[tuple, _Link] = {}
        self._sites: dict[int, _Site] = {}
        self._specs: list[RankSpec] = []
        self._local_run_dir: Optional[Path] = None
        self._script_rel: Optional[str] = None
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._closed = False
        self._known_hosts_lock = asyncio.Lock()
        self._keep_remote: set[int] = set()
        self._purge: Optional[asyncio.Future] = None
        self.run_id: Optional[str] = None
        self.stats: dict[str, Any] = {}
        self.err = sys.stderr

    # -- helpers --------------------------------------------------------------

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _known_hosts_path(self) -> str:
        return os.path.expanduser(self.req.known_hosts or "~/.ssh/known_hosts")

    def _connect_options(self, link: _Link) -> dict:
        req = self.req
        opts: dict[str, Any] = dict(
            keepalive_interval=req.keepalive_s,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
        )
        if req.ssh_config:
            opts["config"] = [os.path.expanduser(req.ssh_config)]
        if req.known_hosts:
            opts["known_hosts"] = os.path.expanduser(req.known_hosts)
        if req.identity:
            opts["client_keys"] = [os.path.expanduser(p) for p in req.identity]
        if link.user:
            opts["username"] = link.user
        if link.port:
            opts["port"] = link.port
        return opts

    async def _connect(self, link: _Link) -> None:
        req = self.req
        if req.ssh_accept_new:
            kh = Path(self._known_hosts_path())
            if not kh.exists():
                kh.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                kh.touch(mode=0o600)
        conn = await asyncio.wait_for(
            asyncssh.connect(link.name, client_factory=lambda: _Client(link, req.ssh_accept_new),
                             **self._connect_options(link)),
            timeout=req.connect_timeout,
        )
        link.conn = conn
        if link.new_key is not None:
            await self._record_host_key(*link.new_key)

    async def _record_host_key(self, host: str, addr: str, port: int, key) -> None:
        """accept-new: append the key to known_hosts the way OpenSSH does (host name and address)."""
        names = [host] + ([addr] if addr and addr != host else [])
        if port and port != 22:
            names = [f"[{n}]:{port}" for n in names]
        line = ",".join(names) + " " + " ".join(key.export_public_key("openssh").decode().split()[:2]) + "\n"
        path = Path(self._known_hosts_path())
        async with self._known_hosts_lock:
            existing = path.read_text() if path.exists() else ""
            if line in existing:
                return
            with open(path, "a") as f:
                if existing and not existing.endswith("\n"):
                    f.write("\n")
                f.write(line)
        self.err.write(f"orch: {host}: trusted a new host key on first use and recorded it in {path}\n")

    def _site_label(self, index: int) -> str:
        name = self.hostfile.hosts[index].name
        dupes = sum(1 for i in self._sites if self.hostfile.hosts[i].name == name)
        label = name if dupes <= 1 else f"{name}-{index}"
        try:
            return collect.safe_name(label)
        except collect.UnsafePath:
            return f"h{index}"

    # -- prepare ----------------------------------------------------------------

    async def prepare(self, specs: list[RankSpec]) -> None:
        """Per host, as a pipeline: connect, open the ranks' sessions (their login shells start
        while we stage, then wait for a release line), stage. Any host that cannot be reached
        fails the whole launch before a rank runs."""
        t0 = time.monotonic()
        self._specs = specs
        self._local_run_dir = Path(specs[0].env["ORCH_RUN_DIR"])
        self.run_id = f"{self._local_run_dir.name}-{secrets.token_hex(3)}"
        script = Path(specs[0].script)
        self._script_rel = script.name

        for spec in specs:
            host = self.hostfile.hosts[spec.host_index]
            key = (host.name, host.user, host.port)
            link = self._links.get(key)
            if link is None:
                link = self._links[key] = _Link(name=host.name, user=host.user, port=host.port)
            site = self._sites.get(spec.host_index)
            if site is None:
                site = self._sites[spec.host_index] = _Site(index=spec.host_index, link=link, label="", stage_code=False)
            if not spec.cwd and spec.program == "script":  # a module or command runs from what is installed there
                site.stage_code = True
        for i, site in self._sites.items():
            site.label = self._site_label(i)

        # Hash the local trees while the connections are being made.
        need_code = any(s.stage_code for s in self._sites.values())
        trees = asyncio.ensure_future(asyncio.to_thread(self._local_trees, script.parent, need_code))
        links = list(self._links.values())

        async def bring_up(link: _Link) -> None:
            try:
                await self._connect(link)
            except Exception as e:
                raise _ConnectFailed(e) from None
            runtime_tree, code_tree = await trees
            await self._open_sftp(link, runtime_tree)
            await asyncio.gather(self._open_sessions(link), self._stage_link(link, runtime_tree, code_tree))

        results = await asyncio.gather(*(bring_up(l) for l in links), return_exceptions=True)
        if not trees.done():
            trees.cancel()
        elif not trees.cancelled():
            trees.exception()  # retrieved: reported through the hosts' results
        for r in results:
            if isinstance(r, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise r
        failed = [(l, r.exc) for l, r in zip(links, results) if isinstance(r, _ConnectFailed)]
        if failed:
            self._close_pending()
            reasons: dict[str, list[str]] = {}  # hosts failing the same way are named together
            for link, exc in failed:
                why = describe_connect_error(exc, timeout=self.req.connect_timeout, known_hosts=self.req.known_hosts,
                                             key_problem=link.key_problem, user=link.user)
                reasons.setdefault(why, []).append(link.name)
            parts = [f"{', '.join(names)}: {why}" for why, names in reasons.items()]
            raise LaunchError(f"cannot reach {len(failed)} of {len(links)} host{'s' if len(links) > 1 else ''}: " + "; ".join(parts))
        failed = [(l, r) for l, r in zip(links, results) if isinstance(r, BaseException)]
        if failed:
            self._close_pending()
            said = [str(e) for _, e in failed if isinstance(e, LaunchError)]
            if said:
                raise LaunchError("; ".join(dict.fromkeys(said)))
            if all(isinstance(e, staging.StagingError) for _, e in failed):
                msgs = sorted({str(e) for _, e in failed})
                if len(msgs) == 1 and not str(msgs[0]).startswith("cannot place"):
                    raise LaunchError(msgs[0])  # a local problem (e.g. a huge script directory): say it once
            raise LaunchError("staging failed on " + "; ".join(f"{l.name}: {staging.describe_sftp_error(e)}" for l, e in failed))
        self.stats = {
            "run_id": self.run_id,
            "prepare_s": round(time.monotonic() - t0, 4),
            "uploaded_files": sum(l.stats.uploaded_files for l in links),
            "uploaded_bytes": sum(l.stats.uploaded_bytes for l in links),
            "hosts": {l.name: l.stats.as_dict() for l in links},
            "remote_dirs": {s.label: s.run_root for s in self._sites.values()},
        }
        self._write_stats()

    def _local_trees(self, script_dir: Path, need_code: bool) -> tuple[staging.Tree, Optional[staging.Tree]]:
        cache = staging._HashCache()
        rt = staging.runtime_tree(cache)
        code = staging.code_tree(script_dir, self.req.stage, cache) if need_code else None
        return rt, code

    async def _open_sftp(self, link: _Link, runtime_tree: staging.Tree) -> None:
        """The host's SFTP session and every remote path of this run (nothing is created yet)."""
        link.sftp = await link.conn.start_sftp_client()
        link.home = await link.sftp.realpath(".")
        base = f"{link.home.rstrip('/')}/{REMOTE_BASE}"
        link.stager = staging.RemoteStager(link.sftp, base, link.stats)
        link.runtime_dir = link.stager.shared_tree_path(runtime_tree, "runtime")
        for site in self._sites.values():
            if site.link is link:
                site.run_root = f"{base}/runs/{self.run_id}-h{site.index}"
                site.run_dir = f"{site.run_root}/run"
                site.code_dir = f"{site.run_root}/code" if site.stage_code else None

    async def _open_sessions(self, link: _Link) -> None:
        """Start each rank's session now: its login shell runs while we stage, then waits at ``read``."""
        for spec in self._specs:
            if self._sites[spec.host_index].link is link:
                link.pending[spec.rank] = await self._new_session(link, spec)

    async def _new_session(self, link: _Link, spec: RankSpec) -> asyncssh.SSHClientProcess:
        try:
            return await link.conn.create_process(self.command_for(spec), encoding=None)
        except asyncssh.ChannelOpenError as e:
            sessions = sum(1 for s in self._specs if self._sites[s.host_index].link is link) + 1
            raise LaunchError(
                f"{link.name} refused SSH session {len(link.pending) + 2} of {sessions} ({e.reason}); every rank "
                "on a host is one session of its connection, plus one for file transfer: raise MaxSessions in "
                "that host's sshd_config (default 10) or run fewer ranks there") from None

    def _close_pending(self) -> None:
        for link in self._links.values():
            for proc in link.pending.values():
                try:
                    proc.close()  # EOF at the shell's read: it exits without starting anything
                except (asyncssh.Error, OSError):
                    pass
            link.pending.clear()

    async def _stage_link(self, link: _Link, runtime_tree: staging.Tree, code_tree: Optional[staging.Tree]) -> None:
        t0 = time.monotonic()
        st = link.stager
        sites = [s for s in self._sites.values() if s.link is link]

        async def site_dirs(site: _Site) -> None:
            await st.makedirs(site.run_root)
            await asyncio.gather(*(link.sftp.mkdir(d) for d in (site.run_dir, site.code_dir) if d),
                                 self._stage_files(link, site))
            if site.code_dir and code_tree is not None:
                await st.materialise(code_tree, site.code_dir, "code")
                self._staged_code = {f.rel: f.size for f in code_tree.files}
            await self._stage_checkpoint(link, site)
            await self._stage_resume_file(link, site)

        async def runtime() -> None:
            await st.shared_tree(runtime_tree, "runtime")

        await asyncio.gather(runtime(), *(site_dirs(s) for s in sites))
        link.stats.seconds = round(time.monotonic() - t0, 4)

    async def _stage_files(self, link: _Link, site: _Site) -> None:
        """The per-job files the ranks' environment names (MLX_IBV_DEVICES), into the site's run root.

        Beside ``run/``, not in it: they are inputs, so collection never brings them
        back, and retiring the run root removes them with the rest.
        """
        files: dict[str, str] = {}
        for spec in self._specs:
            if spec.host_index == site.index:
                files.update({file_name(var): path for var, path in staged_files(spec).items()})
        for name, local in sorted(files.items()):
            await link.sftp.put(local, f"{site.run_root}/{name}")
            link.stats.uploaded_files += 1
            link.stats.uploaded_bytes += os.path.getsize(local)

    def _resume_path(self, site: _Site) -> Optional[str]:
        """--resume-arg on a restart: where this host's copy of the file to resume from is."""
        local = self._specs[0].resume_file if self._specs else None
        return f"{site.run_root}/resume/{Path(local).name}" if local and site.run_root else None

    async def _stage_resume_file(self, link: _Link, site: _Site) -> None:
        """Every host gets the file the restarted attempt resumes from (every rank may load it, as
        mlx-lm loads an adapter file), beside ``run/`` so collection does not bring it back."""
        remote = self._resume_path(site)
        if remote is None:
            return
        local = self._specs[0].resume_file
        await link.sftp.mkdir(remote.rpartition("/")[0])
        await link.sftp.put(local, remote)
        link.stats.uploaded_files += 1
        link.stats.uploaded_bytes += os.path.getsize(local)

    async def _stage_checkpoint(self, link: _Link, site: _Site) -> None:
        """A restarted attempt (--max-restarts) resumes from the checkpoint the last one brought home.

        Every attempt gets a fresh remote run directory, so rank 0's host gets the
        latest complete local checkpoint and its manifest; rank 0 shares it with
        the others at start.
        """
        local = self._local_run_dir / "checkpoints"
        manifest = local / "latest.json"
        if site.index != self._specs[0].host_index or not manifest.is_file():
            return
        try:
            name = json.loads(manifest.read_text()).get("path")
        except ValueError:
            return
        src = local / str(name)
        if not name or not src.is_dir():
            return
        dst = f"{site.run_dir}/checkpoints"
        await link.sftp.mkdir(dst)
        await link.sftp.put(str(src), f"{dst}/{name}", recurse=True)
        await link.sftp.put(str(manifest), f"{dst}/latest.json")
        link.stats.uploaded_files += sum(1 for p in src.iterdir() if p.is_file()) + 1

    def _write_stats(self) -> None:
        if self._local_run_dir is None or not self._local_run_dir.is_dir():
            return
        path = self._local_run_dir / "staging.json"
        tmp = path.with_name(".staging.json.tmp")
        tmp.write_text(json.dumps(self.stats, indent=2) + "\n")
        os.replace(tmp, path)

    # -- start ------------------------------------------------------------------

    def command_for(self, spec: RankSpec) -> str:
        """``read -r orch_go && cd DIR && exec env ... guard -- bootstrap SCRIPT ARGS``: waits for one release line."""
        site = self._sites[spec.host_index]
        python = spec.python or DEFAULT_PYTHON
        if spec.cwd or not site.stage_code:
            cwd, script = spec.cwd or site.link.home, spec.script
        else:
            cwd, script = site.code_dir, f"{site.code_dir}/{self._script_rel}"
        env = remote_env(spec, run_dir=site.run_dir, pythonpath=site.link.runtime_dir, files_dir=site.run_root)
        argv = spec.rank_argv(python, script, guard_flags=(TOKEN_LINE_FLAG,), resume_path=self._resume_path(site))
        return "read -r orch_go && " + build_command(argv, env, cwd)

    async def start(self, spec: RankSpec) -> RankHandle:
        site = self._sites.get(spec.host_index)
        if site is None or site.link.conn is None:
            raise LaunchError(f"{spec.host}: not prepared (prepare() must succeed before start())")
        link = site.link
        if not link.alive:
            raise LaunchError(link.lost_reason)
        self._started = True
        if self._purge is None:
            self._purge = asyncio.ensure_future(self._purge_trash())
        proc = link.pending.pop(spec.rank, None)
        if proc is None or proc.is_closing():  # a restart, or the session went away: a new one
            proc = await self._new_session(link, spec)
        handle = SSHRank(spec, link, proc, self)
        handle.token = new_token()
        # One write, two lines: the shell's ``read`` takes the release line (it reads a pipe
        # byte by byte, never past its newline), the guard it execs then reads the token
        # line, first thing, from the same channel. The token never appears on a command line.
        proc.stdin.write(release_lines(handle.token))
        return handle

    # -- the end ----------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=3.0)
            if self._started:
                await self._collect()
            await self._cleanup_remote()
        finally:
            for link in self._links.values():
                link.closing = True
                if link.conn is not None:
                    link.conn.close()
            await asyncio.gather(*(asyncio.wait_for(l.conn.wait_closed(), 3.0) for l in self._links.values() if l.conn is not None),
                                 return_exceptions=True)

    async def _collect(self) -> None:
        """Checkpoint and files home; a site whose collection failed keeps its remote directory (and says where)."""
        if self._local_run_dir is None:
            return
        live = [s for s in self._sites.values() if s.link.alive and s.link.sftp is not None and s.run_dir]
        reports = {s.index: collect.CollectReport() for s in self._sites.values()}
        rank0_index = next((s.host_index for s in self._specs if s.rank == 0), None)
        # The newest complete checkpoint on any host (normally only rank 0's has one).
        found = await asyncio.gather(*(collect.find_checkpoint(s.link.sftp, s.label, s.run_dir) for s in live),
                                     return_exceptions=True)
        best = None
        for site, cp in zip(live, found):
            if isinstance(cp, collect.RemoteCheckpoint) and (best is None or cp.step > best[1].step):
                best = (site, cp)
        if best is not None:
            site, cp = best
            try:
                await collect.pull_checkpoint(site.link.sftp, cp, self._local_run_dir, reports[site.index])
            except Exception as e:  # unsafe local path, transfer error, or damaged in transit (CheckpointError)
                reports[site.index].errors.append(f"checkpoint {cp.name} from {site.label}: {e}")
        # Everything else: rank 0's host into the run dir itself, the others under hosts/<name>/.
        first = [s for s in live if s.index == rank0_index]
        rest = [s for s in live if s.index != rank0_index]
        for site in first:
            await collect.pull_files(site.link.sftp, site.run_dir, self._local_run_dir, [], reports[site.index],
                                     fallback_prefix=["hosts", site.label])
        # What rank 0 wrote in its working directory, when that is the staged copy of the script's
        # directory (not a --cwd or home directory, which stay the user's): to workdir/, every file
        # staging did not put there (new, or now of another size), bytecode caches left out.
        rank0 = next((s for s in self._specs if s.rank == 0), None)
        staged = getattr(self, "_staged_code", None)
        for site in first:
            if rank0 is not None and not rank0.cwd and site.stage_code and site.code_dir and staged is not None:
                await collect.pull_files(
                    site.link.sftp, site.code_dir, self._local_run_dir, [collect.WORKDIR], reports[site.index],
                    skip=lambda rel, size: staged.get(rel) == size or "__pycache__" in rel.split("/"))
        results = await asyncio.gather(*(collect.pull_files(s.link.sftp, s.run_dir, self._local_run_dir, ["hosts", s.label],
                                                            reports[s.index]) for s in rest), return_exceptions=True)
        for site, r in zip(rest, results):
            if isinstance(r, BaseException):
                reports[site.index].errors.append(f"{site.label}: {r}")
        for site in self._sites.values():
            if site.run_root and site not in live:
                reports[site.index].errors.append(f"{site.label}: not collected ({site.link.lost_reason})")
            if reports[site.index].errors and site.run_root:
                self._keep_remote.add(site.index)
                reports[site.index].errors.append(f"{site.label}: its files stay in {site.run_root}")
        total = collect.CollectReport()
        for r in reports.values():
            total.files += r.files
            total.bytes += r.bytes
            total.checkpoint = total.checkpoint or r.checkpoint
            total.skipped += r.skipped
            total.errors += r.errors
        self.stats["collected"] = {"files": total.files, "bytes": total.bytes, "checkpoint": total.checkpoint,
                                   "skipped": total.skipped, "errors": total.errors}
        self._write_stats()
        for line in total.errors:
            self.err.write(f"orch: collect: {line}\n")
        if total.skipped:
            self.err.write(f"orch: collect: skipped {len(total.skipped)} remote name(s): {', '.join(total.skipped[:5])}\n")

    async def _cleanup_remote(self) -> None:
        """Retire this run's remote directories where collection worked (the object and runtime caches stay).

        One rename per directory into ``runs/.trash-*``: the deletion itself happens in
        the background of a later run on that host (``_purge_trash``), not at the end of this one.
        """
        async def clean(link: _Link) -> None:
            # Over SFTP, not a shell command: a remote session pays for the login shell's rc files.
            roots = [s.run_root for s in self._sites.values()
                     if s.link is link and s.run_root and s.index not in self._keep_remote]
            if not roots or link.sftp is None:
                return

            async def retire(root: str) -> None:
                parent, name = root.rsplit("/", 1)
                try:
                    await link.sftp.posix_rename(root, f"{parent}/{TRASH_PREFIX}{name}")
                except (asyncssh.SFTPError, OSError):
                    await link.sftp.rmtree(root, ignore_errors=True)

            await asyncio.gather(*(asyncio.wait_for(retire(r), 30.0) for r in roots))

        if self._purge is not None:
            await asyncio.wait({self._purge}, timeout=PURGE_WAIT_S)
            if not self._purge.done():
                self._purge.cancel()  # half-emptied trash is still trash; the next run goes on
            await asyncio.gather(self._purge, return_exceptions=True)
        await asyncio.gather(*(clean(l) for l in self._links.values() if l.alive), return_exceptions=True)

    async def _purge_trash(self) -> None:
        """Delete run directories earlier runs retired (any controller's: they were collected already)."""
        if PURGE_DELAY_S:
            await asyncio.sleep(PURGE_DELAY_S)

        async def purge(link: _Link) -> None:
            runs = f"{link.stager.base}/runs"
            try:
                entries = await link.sftp.readdir(runs)
            except (asyncssh.SFTPError, OSError):
                return
            for e in entries:
                if isinstance(e.filename, str) and e.filename.startswith(TRASH_PREFIX):
                    await link.sftp.rmtree(f"{runs}/{e.filename}", ignore_errors=True)

        await asyncio.gather(*(purge(l) for l in self._links.values() if l.alive and l.stager is not None),
                             return_exceptions=True)


# ----------------------------------------------------------------------------- connections for other tools (orch check)
#
# The same connections the launcher makes (ssh_config, known_hosts, identities, user/port,
# accept-new, the same error words), for callers that only need to run commands on hosts.
# Nothing above this line depends on it.


@dataclass
class HostConnection:
    """One host's connection as ``connect_hosts`` made it, or why it could not be made."""

    name: str
    user: Optional[str]
    port: Optional[int]
    conn: Optional[asyncssh.SSHClientConnection] = None
    error: Optional[str] = None       # describe_connect_error's words, None when connected
    key_status: Optional[str] = None  # "known", "accepted-new"; refused: "unknown", "changed"
    connect_s: Optional[float] = None
    _link: Optional[_Link] = None

    @property
    def ok(self) -> bool:
        return self.conn is not None and self.error is None

    @property
    def lost(self) -> bool:
        """The connection went away after it was made (host vanished, keepalives unanswered)."""
        return self._link is not None and self._link.lost.is_set()


async def connect_hosts(hostfile, req, indices=None, err=None) -> dict[int, HostConnection]:
    """Connect to the hostfile's hosts at ``indices`` (default: every host that is not local), all at once.

    ``req`` is a ``RunRequest`` (or anything with its SSH fields). Host entries with the same
    (name, user, port) share one connection. Never raises for a host: each result carries either
    a connection or the reason in words. Close them with ``close_connections``.
    """
    launcher = SSHLauncher(hostfile, req)
    if err is not None:
        launcher.err = err
    if indices is None:
        indices = [i for i, h in enumerate(hostfile.hosts) if not h.is_local]
    by_key: dict[tuple, list[int]] = {}
    for i in indices:
        h = hostfile.hosts[i]
        by_key.setdefault((h.name, h.user, h.port), []).append(i)

    async def one(key: tuple) -> HostConnection:
        name, user, port = key
        link = _Link(name=name, user=user, port=port)
        hc = HostConnection(name=name, user=user, port=port, _link=link)
        t0 = time.monotonic()
        try:
            await launcher._connect(link)
        except Exception as e:  # noqa: BLE001 - every failure becomes words
            hc.error = describe_connect_error(e, timeout=req.connect_timeout, known_hosts=req.known_hosts,
                                              key_problem=link.key_problem, user=user)
            if isinstance(e, asyncssh.HostKeyNotVerifiable):
                hc.key_status = link.key_problem or "unknown"
            return hc
        hc.conn = link.conn
        hc.connect_s = time.monotonic() - t0
        hc.key_status = "accepted-new" if link.new_key is not None else "known"
        return hc

    keys = list(by_key)
    tasks = [asyncio.ensure_future(one(k)) for k in keys]
    try:
        made = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await close_connections({i: hc for i, hc in enumerate(done) if isinstance(hc, HostConnection)})
        raise
    return {i: hc for key, hc in zip(keys, made) for i in by_key[key]}


async def close_connections(conns: dict[int, HostConnection], timeout: float = 3.0) -> None:
    """Close every connection of a ``connect_hosts`` result (shared ones once), bounded by ``timeout``."""
    seen = {id(hc): hc for hc in conns.values() if hc.conn is not None}.values()
    for hc in seen:
        if hc._link is not None:
            hc._link.closing = True
        hc.conn.close()
    await asyncio.gather(*(asyncio.wait_for(hc.conn.wait_closed(), timeout) for hc in seen), return_exceptions=True)
