"""Ranks on remote hosts, over one asyncssh connection per host: connecting and starting ranks.

``prepare`` works per host as a pipeline, all hosts at once: connect
(``remote/ssh.py``; a failure names every host that could not be reached, and
why, in one line), open one SSH session per rank, and stage the runtime and
the script's directory over SFTP (``remote/staging.py``, into the layout of
``remote/sites.py``). Each session runs the line ``launch/ssh_commands.py``
builds::

    read -r orch_go && cd DIR && exec env K=V ... PYTHON -S -m orchestrator.runtime.guard --deferred -- \
        PYTHON -m orchestrator.runtime.bootstrap

The remote login shell (and its rc files, ~0.4 s with pyenv in bash's
.bashrc) starts while we stage, then waits for one line. As soon as its own
host is staged, ``prepare`` sends ``start``: the guard starts, its rank starts
Python and imports MLX while the other hosts are still staging, then waits.
``start`` sends each rank its configuration line (program, arguments and the
guard's token, fresh per rank and attempt, never on a command line) once every
host is ready, so no user code runs anywhere before every host could be
reached and staged. A host's first rank session first runs the staging helper
(``rank_command(helper_python=...)``), so a host with one rank pays for one
login shell, not two. If the launch fails first, the sessions are closed: the
shells exit at ``read``, the guards at end-of-file, stopping their ranks before
any user code ran. A restart (and a ``--stdin`` rank, whose guard must feed its
stdin) uses the plain line instead, ``... guard --token-line -- ... bootstrap
SCRIPT ARGS``, released by ``start`` with the token line. Only events carrying
the token are the guard's, so only its ``spawned`` pid is ever signalled
(``kill_group_command``).

No pty: the guard is what stops a rank, because sshd does not signal a command
when its session ends. The guard stops the rank's process group when its
stdin reaches end-of-file, which happens when ``stop()`` sends EOF, when
``kill()`` closes the session, when this controller dies (the kernel closes
its TCP connection and sshd closes the sessions), and when the controller's
host vanishes (sshd's ``ClientAliveInterval`` notices).

In the other direction, keepalives notice a host that vanished; every rank on
it then ends with exit code 255 and a reason naming the host. After
supervision, ``collect`` brings results home (``remote/collect.py``) from every
host still reachable and retires the run's remote directories (a rename; a
later run deletes them in the background); ``aclose`` closes the connections.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from orchestrator.remote.ssh import asyncssh  # imported there without find_library's slow fallbacks
from orchestrator import protocol
from orchestrator.plan import file_name
from orchestrator.launch.base import (
    ExitStatus,
    LaunchError,
    ControlChannel,
    Launcher,
    RankHandle,
    RankSpec,
    new_token,
)
from orchestrator.launch.ssh_commands import (
    DEFAULT_PYTHON,
    RELEASE,
    staged_files,
    prestarts,
    config_line,
    rank_command,
    exit_signal_status,
    kill_group_command,
    release_lines,
)
from orchestrator.remote import collect, manifest, sites as layout, stager, staging
from orchestrator.remote.sites import HostLink, Site
from orchestrator.remote.ssh import Connection, SSHOptions, connect

LOST_EXIT_CODE = 255  # what ssh(1) exits with when the connection fails
PURGE_WAIT_S = 2.0  # at the end, how long an unfinished purge of earlier runs' trash may still run
PENDING_END_S = 5.0  # a launch that never started: how long its sessions may take to end before the retire


# ----------------------------------------------------------------------------- one rank


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


class SSHRank(RankHandle, ControlChannel):
    """One rank's session. ``ssh``: its host's connection (its loss ends the rank with 255 and the reason);
    ``background``: where ``kill`` puts its remote kill command (the launcher awaits those at the end)."""

    def __init__(self, spec: RankSpec, ssh: Connection, proc: asyncssh.SSHClientProcess, background=None):
        self.rank = spec.rank
        self.host = spec.host
        self.ssh = ssh
        self.proc = proc
        self._background = background or asyncio.ensure_future
        self.stdout = _Lines(proc.stdout)
        self.stderr = _Lines(proc.stderr)
        self.rank_pid = None

    def send_control(self, line: str) -> None:
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
        if command and self.ssh.alive:
            self._background(self.ssh.conn.run(command, check=False))

    async def wait(self) -> ExitStatus:
        closed = asyncio.ensure_future(self.proc.wait_closed())
        lost = asyncio.ensure_future(self.ssh.gone.wait())
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
        if self.ssh.lost:
            return ExitStatus(code=LOST_EXIT_CODE, signal=None, reason=self.ssh.lost_reason)
        return ExitStatus(code=LOST_EXIT_CODE, signal=None,
                          reason=f"the SSH session on {self.ssh.name} closed without an exit status")


# ----------------------------------------------------------------------------- the launcher


class SSHLauncher(Launcher):
    """``ssh``: how to reach the hosts; ``stage``: extra paths to upload (--stage); ``err``: where notes go."""

    name = "ssh"

    def __init__(self, hostfile, ssh: SSHOptions, *, stage: Sequence[str] = (), err=None):
        self.hostfile = hostfile
        self.ssh = ssh
        self.stage = list(stage)
        self.err = err or sys.stderr
        self.links: dict[tuple, HostLink] = {}   # (name, user, port) -> the one connection
        self.sites: dict[int, Site] = {}          # host index -> its remote run root
        self.specs: list[RankSpec] = []
        self.run_id: Optional[str] = None
        self.stats: dict = {}                     # what staging.json says
        self._local_run_dir: Optional[Path] = None
        self._code_tree: Optional[manifest.Tree] = None
        self._pending: dict[int, asyncssh.SSHClientProcess] = {}  # rank -> session opened in prepare, not yet started
        self._deferred: set[int] = set()          # ranks whose pending session starts a --deferred guard
        self._released: set[int] = set()          # ... and whose shell got its release line (its rank is importing)
        self._ending: list[asyncssh.SSHClientProcess] = []  # sessions told to end (EOF), not yet closed
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._collected = False
        self._closed = False
        self._purge: Optional[asyncio.Future] = None

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- prepare ----------------------------------------------------------------

    async def prepare(self, specs: list[RankSpec]) -> None:
        """Per host, as a pipeline: connect, open the ranks' sessions (their login shells start
        while we stage, then wait for a release line), stage. Any host that cannot be reached
        fails the whole launch before a rank runs."""
        t0 = time.monotonic()
        self.specs = specs
        self._local_run_dir = Path(specs[0].env[protocol.ENV_RUN_DIR])
        self.run_id = layout.new_run_id(self._local_run_dir)
        script = Path(specs[0].script)
        for spec in specs:
            host = self.hostfile.hosts[spec.host_index]
            key = (host.name, host.user, host.port)
            link = self.links.get(key)
            if link is None:
                link = self.links[key] = HostLink(ssh=Connection(name=host.name, user=host.user, port=host.port))
            site = self.sites.get(spec.host_index)
            if site is None:
                site = self.sites[spec.host_index] = Site(index=spec.host_index, link=link)
            if not spec.cwd and spec.program == "script":  # a module or command runs from what is installed there
                site.stage_code = True
        names = {i: self.hostfile.hosts[i].name for i in self.sites}
        for i, site in self.sites.items():
            site.label = layout.site_label(names, i)

        # Hash the local trees while the connections are being made.
        need_code = any(s.stage_code for s in self.sites.values())
        trees = asyncio.ensure_future(asyncio.to_thread(manifest.local_trees, script.parent, need_code, self.stage))
        links = list(self.links.values())
        inputs = self._site_inputs()

        async def bring_up(link: HostLink) -> None:
            c = link.ssh
            link.ssh = await connect(c.name, self.ssh, user=c.user, port=c.port, err=self.err)
            if not link.ssh.ok:
                return
            runtime_tree, code_tree = await trees
            self._code_tree = code_tree
            sites = [s for s in self.sites.values() if s.link is link]
            python = next((s.python for s in self.specs if self.sites[s.host_index].link is link and s.python), DEFAULT_PYTHON)
            await staging.open_host(link, runtime_tree, sites, self.run_id, python=python)
            first = next(s for s in self.specs if self.sites[s.host_index].link is link)
            carrier = staging.SessionHelper(await self._new_session(link, first, helper_python=python))
            self._pending[first.rank] = carrier.proc
            link.stager.first_helper = carrier.run
            await asyncio.gather(self._open_sessions(link), staging.stage_host(link, sites, runtime_tree, code_tree, inputs))
            if carrier.failed or carrier.proc.is_closing():  # the helper did not answer there: a plain session
                self._pending.pop(first.rank, None)
                carrier.proc.close()
                self._pending[first.rank] = await self._new_session(link, first)
            self._release_prestarts(link)

        results = await asyncio.gather(*(bring_up(l) for l in links), return_exceptions=True)
        if not trees.done():
            trees.cancel()
        elif not trees.cancelled():
            trees.exception()  # retrieved: reported through the hosts' results
        for r in results:
            if isinstance(r, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise r
        unreachable = [l for l in links if not l.ssh.ok]
        if unreachable:
            self._close_pending()
            reasons: dict[str, list[str]] = {}  # hosts failing the same way are named together
            for link in unreachable:
                reasons.setdefault(link.ssh.error, []).append(link.name)
            parts = [f"{', '.join(names)}: {why}" for why, names in reasons.items()]
            raise LaunchError(f"cannot reach {len(unreachable)} of {len(links)} host{'s' if len(links) > 1 else ''}: "
                              + "; ".join(parts))
        failed = [(l, r) for l, r in zip(links, results) if isinstance(r, BaseException)]
        if failed:
            self._close_pending()
            said = [str(e) for _, e in failed if isinstance(e, LaunchError)]
            if said:
                raise LaunchError("; ".join(dict.fromkeys(said)))
            if all(isinstance(e, manifest.StagingError) for _, e in failed):
                msgs = sorted({str(e) for _, e in failed})
                if len(msgs) == 1 and not str(msgs[0]).startswith("cannot place"):
                    raise LaunchError(msgs[0])  # a local problem (e.g. a huge script directory): say it once
            raise LaunchError("staging failed on " + "; ".join(f"{l.name}: {stager.describe_sftp_error(e)}" for l, e in failed))
        self.stats = layout.stats_summary(self.run_id, time.monotonic() - t0, links, self.sites.values())
        layout.write_stats(self._local_run_dir, self.stats)

    def _site_inputs(self) -> dict[int, staging.SiteInputs]:
        """Per site: the per-job files its ranks' environment names, and on a restart the latest local
        checkpoint (rank 0's site) and the --resume-arg file (every site)."""
        rank0 = next((s for s in self.specs if s.rank == 0), self.specs[0])
        checkpoint = layout.latest_checkpoint(self._local_run_dir)
        out: dict[int, staging.SiteInputs] = {}
        for i in self.sites:
            got = out[i] = staging.SiteInputs(checkpoint=checkpoint if i == rank0.host_index else None,
                                              resume_file=self.specs[0].resume_file)
            for spec in self.specs:
                if spec.host_index == i:
                    got.files.update({file_name(var): path for var, path in staged_files(spec).items()})
        return out

    async def _open_sessions(self, link: HostLink) -> None:
        """Start each rank's session now: its login shell runs while we stage, then waits at ``read``."""
        for spec in self.specs:
            if self.sites[spec.host_index].link is link and spec.rank not in self._pending:
                self._pending[spec.rank] = await self._new_session(link, spec)

    def _release_prestarts(self, link: HostLink) -> None:
        """The host is staged: its deferred sessions may start their guards (each rank imports MLX now and
        waits for its configuration line, which ``start`` sends once every host is ready)."""
        for spec in self.specs:
            proc = self._pending.get(spec.rank)
            if (proc is None or spec.rank not in self._deferred or spec.rank in self._released
                    or self.sites[spec.host_index].link is not link):
                continue
            try:
                proc.stdin.write(RELEASE)
                self._released.add(spec.rank)
            except (asyncssh.Error, OSError, BrokenPipeError):
                pass  # the session is gone: start() opens a plain one

    async def _new_session(self, link: HostLink, spec: RankSpec, helper_python: Optional[str] = None,
                           deferred: Optional[bool] = None) -> asyncssh.SSHClientProcess:
        """One rank's session; ``deferred`` (default: ``prestarts(spec)``) makes it start a --deferred guard
        once released (``rank_command``). Restarts pass False: their start is released at once."""
        deferred = prestarts(spec) if deferred is None else deferred
        try:
            command = rank_command(spec, self.sites[spec.host_index], helper_python=helper_python, deferred=deferred)
            proc = await link.ssh.conn.create_process(command, encoding=None)
            (self._deferred.add if deferred else self._deferred.discard)(spec.rank)
            self._released.discard(spec.rank)
            return proc
        except asyncssh.ChannelOpenError as e:
            mine = [s.rank for s in self.specs if self.sites[s.host_index].link is link]
            opened = sum(1 for r in mine if r in self._pending)
            raise LaunchError(
                f"{link.name} refused SSH session {opened + 2} of {len(mine) + 1} ({e.reason}); every rank "
                "on a host is one session of its connection, plus one for file transfer: raise MaxSessions in "
                "that host's sshd_config (default 10) or run fewer ranks there") from None

    def _close_pending(self) -> None:
        """End-of-file to every session prepare opened that started no rank: a shell at ``read`` exits, a
        released ``--deferred`` guard stops its rank, a staging helper finishes what it is placing, then exits.
        ``aclose`` waits for them (bounded) before it retires the hosts' run directories: a helper still
        writing there after the rename would bring the directory back."""
        for proc in self._pending.values():
            try:
                proc.stdin.write_eof()
            except (asyncssh.Error, OSError, BrokenPipeError):
                pass
        self._ending.extend(self._pending.values())
        self._pending.clear()

    async def _end_sessions(self, timeout: float = PENDING_END_S) -> None:
        self._close_pending()
        procs, self._ending = self._ending, []
        waits = {asyncio.ensure_future(p.wait_closed()) for p in procs}
        if waits:
            _, late = await asyncio.wait(waits, timeout=timeout)
            for w in late:
                w.cancel()
        for proc in procs:
            try:
                proc.close()
            except (asyncssh.Error, OSError):
                pass

    # -- start ------------------------------------------------------------------

    def command_for(self, spec: RankSpec) -> str:
        """The remote line of a prepared rank (``rank_command`` on its site)."""
        return rank_command(spec, self.sites[spec.host_index])

    async def start(self, spec: RankSpec) -> RankHandle:
        site = self.sites.get(spec.host_index)
        if site is None or site.link.ssh.conn is None:
            raise LaunchError(f"{spec.host}: not prepared (prepare() must succeed before start())")
        link = site.link
        if not link.ssh.alive:
            raise LaunchError(link.ssh.lost_reason)
        self._started = True
        if self._purge is None:  # earlier runs' trash, deleted while the ranks start
            self._purge = asyncio.ensure_future(layout.purge_trash(self.links.values()))
        proc = self._pending.pop(spec.rank, None)
        if proc is None or proc.is_closing():  # a restart, or the session went away: a new one
            proc = await self._new_session(link, spec, deferred=False)
        handle = SSHRank(spec, link.ssh, proc, self._background)
        handle.token = new_token()
        # One write, two lines: the shell's ``read`` takes the release line (it reads a pipe
        # byte by byte, never past its newline), the guard it execs then reads the token
        # line (a deferred guard: its configuration line, token inside), first thing, from the
        # same channel. The token never appears on a command line.
        if spec.rank in self._deferred:
            released = spec.rank in self._released
            proc.stdin.write((b"" if released else RELEASE) + config_line(spec, site, handle.token))
        else:
            proc.stdin.write(release_lines(handle.token))
        return handle

    # -- the end ----------------------------------------------------------------

    async def collect(self, local_run_dir: Optional[Path] = None) -> None:
        """After supervision: results home from every site still reachable (``remote/collect.py``), then the
        sites whose collection worked are retired (``sites.retire``). Once; nothing if no rank started."""
        if self._collected:
            return
        self._collected = True
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=3.0)
        local = Path(local_run_dir) if local_run_dir is not None else self._local_run_dir
        keep: set[int] = set()
        if self._started and local is not None:
            rank0 = next((s for s in self.specs if s.rank == 0), None)
            staged = ({f.rel: f.size for f in self._code_tree.files}
                      if self._code_tree is not None and rank0 is not None and not rank0.cwd else None)
            collected, keep = await collect.collect_run(local, list(self.sites.values()),
                                                        rank0.host_index if rank0 else None, staged, self.err)
            self.stats["collected"] = collected
            layout.write_stats(local, self.stats)
        if self._purge is not None:
            await asyncio.wait({self._purge}, timeout=PURGE_WAIT_S)
            if not self._purge.done():
                self._purge.cancel()  # half-emptied trash is still trash; the next run goes on
            await asyncio.gather(self._purge, return_exceptions=True)
        await asyncio.gather(*(layout.retire(l, [s.run_root for s in self.sites.values()
                                                  if s.link is l and s.run_root and s.index not in keep])
                               for l in self.links.values() if l.usable), return_exceptions=True)

    async def aclose(self) -> None:
        """Close the connections (retiring the remote sites first if ``collect`` never ran: a failed prepare)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._collected:
                self._collected = True  # nothing ran that could have results: retire only
                await self._end_sessions()
                if self._tasks:
                    await asyncio.wait(list(self._tasks), timeout=3.0)
                await asyncio.gather(*(layout.retire(l, [s.run_root for s in self.sites.values() if s.link is l and s.run_root])
                                       for l in self.links.values() if l.usable), return_exceptions=True)
        finally:
            for link in self.links.values():
                link.ssh.close()
            await asyncio.gather(*(l.ssh.wait_closed() for l in self.links.values()))
