"""Ranks on this machine, as asyncio subprocesses under the guard.

Each guard gets its own session, so a Ctrl-C typed at the terminal reaches
only the controller, which then stops every rank in order; the guard in turn
gives the rank its own process group. If the controller is killed outright,
the guards see their stdin close and stop their ranks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from orchestrator.launch.base import ExitStatus, Launcher, RankHandle, RankSpec

# Ranks import orchestrator.runtime from this checkout even under another --python.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class LocalRank(RankHandle):
    def __init__(self, spec: RankSpec, proc: asyncio.subprocess.Process):
        self.rank = spec.rank
        self.host = spec.host
        self.proc = proc
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def send(self, line: str) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(line.encode() + b"\n")

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    def kill(self) -> None:
        for pgid in (self.rank_pid, self.proc.pid):
            if pgid is None:
                continue
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    async def wait(self) -> ExitStatus:
        rc = await self.proc.wait()
        if rc < 0:
            return ExitStatus(code=None, signal=-rc)
        return ExitStatus(code=rc, signal=None)


class LocalLauncher(Launcher):
    name = "local"

    async def start(self, spec: RankSpec) -> RankHandle:
        env = dict(os.environ)
        env.pop("MLX_HOSTFILE", None)
        env.update(spec.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            *spec.rank_argv(spec.python or sys.executable),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=spec.cwd,
            start_new_session=True,
            limit=1 << 20,
        )
        return LocalRank(spec, proc)
