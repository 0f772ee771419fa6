"""Ranks on this machine, as asyncio subprocesses under the guard.

Each guard gets its own session, so a Ctrl-C typed at the terminal reaches
only the controller, which then stops every rank in order; the guard in turn
gives the rank its own process group. If the controller is killed outright,
the guards see their stdin close and stop their ranks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Optional

from orchestrator import protocol
from orchestrator.launch import prespawn
from orchestrator.launch.base import (TOKEN_LINE_FLAG, ControlChannel, ExitStatus, Launcher, RankHandle, RankSpec, new_token,
                                      token_line)

# Ranks import orchestrator.runtime from this checkout even under another --python.
PACKAGE_ROOT = prespawn.PACKAGE_ROOT


def guards_group(pgid: Optional[int], guard_pid: int) -> bool:
    """Whether ``pgid`` is still the group of the guard's rank: its leader leads it and is the guard's child.

    ``pgid`` comes from the guard's authenticated ``spawned`` event; this check
    also keeps a recycled pid (the rank exited long ago) from being signalled.
    """
    if isinstance(pgid, bool) or not isinstance(pgid, int) or pgid <= 1:
        return False
    try:
        import psutil

        return os.getpgid(pgid) == pgid and psutil.Process(pgid).ppid() == guard_pid
    except Exception:  # gone, not ours, or no psutil: never signal
        return False


def kill_rank_groups(rank_pid: Optional[int], guard: "subprocess.Popen | asyncio.subprocess.Process") -> None:
    """SIGKILL the rank's and the guard's process groups (last resort when the guard does not react).

    Only groups that are provably ours: the guard's (it leads its own session
    and is our child, not yet reaped, so its pid cannot have been reused) and
    the rank's while it is still the guard's child.
    """
    guard_alive = guard.returncode is None
    targets = []
    if rank_pid is not None and guard_alive and guards_group(rank_pid, guard.pid):
        targets.append(rank_pid)
    if guard_alive:
        targets.append(guard.pid)
    for pgid in targets:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class LocalRank(RankHandle, ControlChannel):
    def __init__(self, spec: RankSpec, proc: asyncio.subprocess.Process, token: Optional[str] = None):
        self.rank = spec.rank
        self.host = spec.host
        self.proc = proc
        self.token = token
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def send_control(self, line: str) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(line.encode() + b"\n")

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    def kill(self) -> None:
        kill_rank_groups(self.rank_pid, self.proc)

    async def wait(self) -> ExitStatus:
        return ExitStatus.from_returncode(await self.proc.wait())


class PrestartedRank(RankHandle, ControlChannel):
    """A rank started by ``prespawn`` before the plan existed, adopted into asyncio."""

    def __init__(self, spec: RankSpec, proc: subprocess.Popen, stdin: asyncio.WriteTransport,
                 stdout: asyncio.StreamReader, stderr: asyncio.StreamReader, token: Optional[str] = None):
        self.rank = spec.rank
        self.host = spec.host
        self.proc = proc
        self.token = token
        self._stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future = loop.create_future()
        if hasattr(os, "pidfd_open"):  # Linux: the event loop wakes when the guard exits
            self._pidfd = os.pidfd_open(proc.pid)
            loop.add_reader(self._pidfd, self._on_exit)
        else:  # macOS: a thread blocks in waitpid for it (as asyncio's ThreadedChildWatcher does)
            threading.Thread(target=self._wait_in_thread, args=(loop,), name=f"orch-wait-{proc.pid}",
                             daemon=True).start()

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._settle(self.proc.wait())

    def _wait_in_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        rc = self.proc.wait()
        try:
            loop.call_soon_threadsafe(self._settle, rc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _settle(self, rc: int) -> None:
        if not self._exited.done():
            self._exited.set_result(rc)

    def send_control(self, line: str) -> None:
        if not self._stdin.is_closing():
            self._stdin.write(line.encode() + b"\n")

    def stop(self) -> None:
        if not self._stdin.is_closing():
            self._stdin.close()

    def kill(self) -> None:
        kill_rank_groups(self.rank_pid, self.proc)

    async def wait(self) -> ExitStatus:
        return ExitStatus.from_returncode(await self._exited)


def _configure(spec: RankSpec, proc: subprocess.Popen) -> Optional[str]:
    """Send a pre-started guard its rank's configuration; the token, or None if that guard is gone.

    A ``--deferred`` guard reads its token from this line (not a separate token line).
    """
    token = new_token()
    config = {"env": spec.env, "argv": spec.program_argv(), "cwd": spec.cwd, "token": token}
    try:
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
    except (OSError, ValueError):  # it exited (or was closed): this rank starts fresh
        prespawn.close(proc)
        return None
    return token


async def _adopt(spec: RankSpec, proc: subprocess.Popen, token: str) -> PrestartedRank:
    loop = asyncio.get_running_loop()
    readers = []
    for pipe in (proc.stdout, proc.stderr):
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)
        readers.append(reader)
    stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
    return PrestartedRank(spec, proc, stdin, *readers, token=token)


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self) -> None:
        self._configured: dict[int, tuple[subprocess.Popen, str]] = {}  # rank -> its pre-started guard, token

    async def prepare(self, specs: list[RankSpec]) -> None:
        """Hand every pre-started rank its configuration now, before the supervisor exists.

        Its program then runs while the controller is still loading the supervisor's modules
        (~60 ms of a trivial launch); what it prints waits in its pipes, which the supervisor
        adopts in ``start``. A guard whose controller goes away before that sees EOF and stops
        its rank (``aclose`` does the same on purpose).
        """
        for spec in specs:
            # A pre-started guard started its rank with /dev/null as stdin: --stdin ranks start fresh.
            if spec.python is not None or protocol.ENV_STDIN in spec.env:
                continue
            proc = prespawn.take()
            if proc is None:
                return
            token = _configure(spec, proc)
            if token is not None:
                self._configured[spec.rank] = (proc, token)

    async def start(self, spec: RankSpec) -> RankHandle:
        configured = self._configured.pop(spec.rank, None)
        if configured is not None:
            return await _adopt(spec, *configured)
        env = dict(os.environ)
        env.pop("MLX_HOSTFILE", None)
        env.update(spec.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            *spec.rank_argv(spec.python or sys.executable, guard_flags=(TOKEN_LINE_FLAG,)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=spec.cwd,
            start_new_session=True,
            limit=1 << 20,
        )
        token = new_token()
        proc.stdin.write((token_line(token) + "\n").encode())  # the guard's first line, before any other
        return LocalRank(spec, proc, token)

    async def aclose(self) -> None:
        """Configured guards never adopted (the run ended before the supervisor started them) stop their ranks."""
        while self._configured:
            _, (proc, _) = self._configured.popitem()
            await asyncio.get_running_loop().run_in_executor(None, prespawn.close, proc)
