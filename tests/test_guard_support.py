"""Shared pieces of the guard tests: start a real guard (optionally with its macOS branch forced), read its
output with a bound, and clean up every process a test started, by pid."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from orchestrator import protocol
from tests.orch_helpers import ROOT, alive

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
for _var in ("ORCH_EVENTS", "ORCH_LISTEN", "ORCH_HOLD", "ORCH_GATED", "ORCH_GUARD_RSS", "MLX_RANK"):
    ENV.pop(_var, None)

# Runs the guard as `python -S` with sys.platform forced first: every platform branch on this machine.
FORCED = "import sys; sys.platform = {platform!r}; from orchestrator.runtime import guard; sys.exit(guard.main(sys.argv[1:]))"


class Guarded:
    """One running guard: its Popen, and the lines it (and its rank) wrote, read with a bound."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._partial = b""
        self.pids: list[int] = [proc.pid]  # for cleanup; tests add the rank's

    def _read_some(self, timeout: float) -> bool:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return True
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        self._partial += chunk
        *done, self._partial = self._partial.split(b"\n")
        self.lines.extend(d.decode(errors="replace") for d in done)
        return True

    def wait_line(self, pred, timeout: float = 60) -> str:
        """The first line (seen so far or later) for which pred(line) holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if pred(line):
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such line within {timeout}s; output so far: {self.lines}")
            if not self._read_some(min(left, 0.5)):
                if not any(pred(line) for line in self.lines[seen:]):
                    raise AssertionError(f"output ended without such a line: {self.lines}")

    def wait_text(self, text: str, timeout: float = 60) -> str:
        return self.wait_line(lambda line: protocol.MARKER not in line and text in line, timeout)

    def wait_event(self, kind: str, timeout: float = 60) -> dict:
        line = self.wait_line(lambda line: (protocol.split_line(line)[1] or {}).get("kind") == kind, timeout)
        return protocol.split_line(line)[1]

    def finish(self, timeout: float = 60) -> int:
        """Read everything up to EOF (bounded) and the guard's exit status."""
        deadline = time.monotonic() + timeout
        while self._read_some(max(0.0, min(0.5, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise AssertionError(f"the guard did not finish within {timeout}s: {self.lines}")
        if self._partial:
            self.lines.append(self._partial.decode(errors="replace"))
            self._partial = b""
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def events(self) -> list[dict]:
        return [e for e in (protocol.split_line(line)[1] for line in self.lines) if e is not None]

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""


@pytest.fixture
def start_guard():
    """start_guard(*cmd, flags=(), platform=None, env=None) -> Guarded; all killed (by pid) at the end."""
    started: list[Guarded] = []

    def start(*cmd: str, flags=(), platform=None, env=None, wrapper=None) -> Guarded:
        if wrapper is not None:
            head = [sys.executable, "-S", "-c", wrapper]
        elif platform is not None:
            head = [sys.executable, "-S", "-c", FORCED.format(platform=platform)]
        else:
            head = [sys.executable, "-S", "-m", "orchestrator.runtime.guard"]
        proc = subprocess.Popen([*head, *flags, "--", *cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**ENV, **(env or {})}, start_new_session=True)
        g = Guarded(proc)
        started.append(g)
        return g

    yield start
    for g in started:
        for pid in g.pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            g.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (g.proc.stdin, g.proc.stdout, g.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        alive(g.pids, timeout=5)


def pids_line(g: Guarded, n: int, timeout: float = 60) -> list[int]:
    """A rank prints "pids A B ..." first; remember them for cleanup."""
    line = g.wait_line(lambda line: line.startswith("pids "), timeout)
    pids = [int(x) for x in line.split()[1:]]
    assert len(pids) == n, line
    g.pids.extend(pids)
    return pids


def as_json(line: str) -> dict:
    return json.loads(line)
