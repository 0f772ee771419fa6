"""The one small interface every way of starting ranks implements.

Shaped after DeepSpeed's multinode runners and torch elastic's process
context: a launcher knows how to start one rank (under the guard) and hands
back a handle with the rank's output streams, a way to send control lines,
a way to ask it to stop, and its exit status. Everything else — output
routing, events, failure policy — lives in the supervisor, once.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Protocol


@dataclass
class RankSpec:
    """What to run for one rank, after planning; each launcher turns it into a command.

    ``env`` holds only what orch adds (MLX_RANK, ORCH_*, hostfile and --env
    values): a local launcher layers it over this process's environment, a
    remote one sends exactly these. ``mlx_hostfile_json`` is the content
    behind ``env["MLX_HOSTFILE"]`` for launchers that cannot share the file.
    """

    rank: int
    host: str
    script: str
    script_args: list[str] = field(default_factory=list)
    python: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    host_index: int = 0
    mlx_hostfile_json: Optional[str] = None

    def rank_argv(self, python: str, script: Optional[str] = None, guard_flags: tuple[str, ...] = ()) -> list[str]:
        """The guarded command line of this rank.

        The guard runs with ``-S`` (no site-packages: it needs only the standard
        library and ``orchestrator`` from PYTHONPATH), which saves every rank the
        cost of site's .pth hooks before the rank itself can start.
        """
        return [python, "-S", "-m", "orchestrator.runtime.guard", *guard_flags, "--",
                python, "-m", "orchestrator.runtime.bootstrap", script or self.script, *self.script_args]


@dataclass
class ExitStatus:
    code: Optional[int]
    signal: Optional[int]
    reason: Optional[str] = None  # set by a launcher that knows more, e.g. "SSH connection to mac2 lost"

    @classmethod
    def from_returncode(cls, rc: int) -> "ExitStatus":
        """A subprocess return code: negative means killed by that signal."""
        return cls(code=None, signal=-rc) if rc < 0 else cls(code=rc, signal=None)

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.signal is None

    @property
    def shell_code(self) -> int:
        """The status as a shell reports it: the code, or 128+signal."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 1


class LineReader(Protocol):
    async def readline(self) -> bytes | str: ...


class RankHandle(abc.ABC):
    rank: int
    host: str
    stdout: LineReader
    stderr: LineReader
    rank_pid: Optional[int] = None  # the trainer's pid, from the guard's "spawned" event

    @abc.abstractmethod
    def send(self, line: str) -> None:
        """Write one control line to the guard (e.g. ``go``)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask the rank to stop: the guard terminates its process group."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Last resort when the guard itself does not react in time."""

    @abc.abstractmethod
    async def wait(self) -> ExitStatus: ...


class LaunchError(Exception):
    """Ranks could not be started (hosts unreachable, staging failed); the message says which and why."""


class Launcher(abc.ABC):
    name: str = "base"

    async def prepare(self, specs: list[RankSpec]) -> None:
        """Reach the hosts and stage what the ranks need, before any rank starts.

        Raises ``LaunchError`` naming every host that failed and why.
        """
        return None

    @abc.abstractmethod
    async def start(self, spec: RankSpec) -> RankHandle: ...

    async def aclose(self) -> None:
        """Release connections; called once after every rank has exited."""
        return None
