"""Running ``orch check``'s probe on one host: a local subprocess or an SSH session, the same handle for both.

Every probe ends when its stdin closes, so ``finish`` (stdin EOF, a bounded wait, then kill)
is the one way a probe is stopped; ``read_report`` waits, bounded, for its ``ORCHCHECK``
line and turns every way of not getting one into words (``ProbeFailed``).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import time
from typing import Optional

from orchestrator.probe import probes

REMOTE_PYTHON = "python3"


class ProbeFailed(Exception):
    """A probe gave no report; the message says why in words."""


class Proc:
    """One running probe: line-wise stdout, stdin, bounded waits, stderr kept for the diagnosis."""

    def __init__(self, python: str):
        self.python = python
        self.stderr_text = ""
        self._stderr_task: Optional[asyncio.Task] = None

    async def _drain_stderr(self, stream) -> None:
        try:
            while True:
                chunk = await stream.read(4096)
                if not chunk:
                    return
                if isinstance(chunk, bytes):
                    chunk = chunk.decode("utf-8", "replace")
                self.stderr_text = (self.stderr_text + chunk)[-4000:]
        except Exception:  # noqa: BLE001 - the stream went away with the process
            return

    async def readline(self) -> str:
        raise NotImplementedError

    def write(self, text: str) -> None:
        raise NotImplementedError

    def close_stdin(self) -> None:
        raise NotImplementedError

    async def wait(self, timeout: float) -> Optional[int]:
        """The exit code, or None when the probe did not end within ``timeout``."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    async def finish(self, timeout: float = 2.0) -> None:
        """stdin EOF (every probe ends on it), then a bounded wait, then kill."""
        self.close_stdin()
        if await self.wait(timeout) is None:
            self.kill()
            await self.wait(2.0)
        if self._stderr_task is not None:
            await asyncio.wait({self._stderr_task}, timeout=1.0)
            if not self._stderr_task.done():
                self._stderr_task.cancel()


class LocalProc(Proc):
    def __init__(self, python: str, proc: asyncio.subprocess.Process):
        super().__init__(python)
        self.proc = proc
        self._stderr_task = asyncio.ensure_future(self._drain_stderr(proc.stderr))

    async def readline(self) -> str:
        return (await self.proc.stdout.readline()).decode("utf-8", "replace")

    def write(self, text: str) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(text.encode())

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def wait(self, timeout: float) -> Optional[int]:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    def kill(self) -> None:
        if self.proc.returncode is not None:  # reaped: its pid may belong to someone else by now
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class SSHProc(Proc):
    def __init__(self, python: str, proc):
        super().__init__(python)
        self.proc = proc
        self._stderr_task = asyncio.ensure_future(self._drain_stderr(proc.stderr))

    async def readline(self) -> str:
        try:
            return await self.proc.stdout.readline()
        except Exception:  # noqa: BLE001 - connection lost: end of output
            return ""

    def write(self, text: str) -> None:
        try:
            if not self.proc.stdin.is_closing():
                self.proc.stdin.write(text)
        except Exception:  # noqa: BLE001
            pass

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.write_eof()
        except Exception:  # noqa: BLE001
            pass

    async def wait(self, timeout: float) -> Optional[int]:
        try:
            await asyncio.wait_for(self.proc.wait_closed(), timeout)
        except asyncio.TimeoutError:
            return None
        except Exception:  # noqa: BLE001
            return -1
        return self.proc.exit_status if self.proc.exit_status is not None else -1

    def kill(self) -> None:
        """Close the session: the probe sees stdin end and exits (sshd does not signal it)."""
        try:
            self.proc.close()
        except Exception:  # noqa: BLE001
            pass


class Runner:
    """Starts probes on one host: a local subprocess, or an SSH session."""

    def __init__(self, name: str, python: str, env: dict[str, str], conn=None):
        self.name = name
        self.python = python
        self.env = env
        self.conn = conn
        self.procs: list[Proc] = []

    @property
    def local(self) -> bool:
        return self.conn is None

    async def start(self, mode: str, config: dict) -> Proc:
        argv = probes.probe_argv(self.python, mode, config)
        if self.local:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    env={**os.environ, **self.env}, start_new_session=True, limit=1 << 22)
            except FileNotFoundError:
                raise ProbeFailed(f"{self.python}: no such file") from None
            except PermissionError:
                raise ProbeFailed(f"{self.python}: not executable") from None
            except OSError as e:
                raise ProbeFailed(f"{self.python}: cannot start ({e.strerror or e})") from None
            p: Proc = LocalProc(self.python, proc)
        else:
            env = " ".join(shlex.quote(f"{k}={v}") for k, v in self.env.items())
            command = "exec " + (f"env {env} " if env else "") + " ".join(shlex.quote(a) for a in argv)
            try:
                proc = await self.conn.create_process(command, encoding="utf-8", errors="replace")
            except Exception as e:  # noqa: BLE001 - channel refused, connection lost
                raise ProbeFailed(f"cannot open an SSH session ({getattr(e, 'reason', None) or e})") from None
            p = SSHProc(self.python, proc)
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            p.kill()


async def read_report(proc: Proc, timeout: float) -> dict:
    """Read until the probe's ``ORCHCHECK`` line (login shells may print first); ProbeFailed in words otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = await asyncio.wait_for(proc.readline(), max(0.01, left))
        except asyncio.TimeoutError:
            proc.kill()
            raise ProbeFailed(f"no answer within {timeout:g}s from {proc.python} (see --timeout)") from None
        if not line:
            rc = await proc.wait(2.0)
            raise ProbeFailed(describe_probe_exit(proc.python, rc, proc.stderr_text))
        rep = probes.parse_report(line)
        if rep is not None:
            return rep


def describe_probe_exit(python: str, rc: Optional[int], stderr: str) -> str:
    """Why a probe ended without a report (exit 127 from the login shell: the interpreter is missing)."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    last = lines[-1].strip() if lines else ""
    if rc == 127 or "command not found" in stderr or (rc is not None and "not found" in last and python in last):
        return f"{python}: not found on this host (set \"python\" in the hostfile or --python)"
    if rc == 126:
        return f"{python}: not executable"
    return f"{python} exited with code {rc}" + (f": {last}" if last else " without a report")

