"""The one small interface every way of starting ranks implements.

Shaped after DeepSpeed's multinode runners and torch elastic's process
context: a launcher knows how to start one rank (under the guard) and hands
back a handle with the rank's output streams, a way to send control lines,
a way to ask it to stop, and its exit status. Everything else — output
routing, events, failure policy — lives in the supervisor, once.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import Optional, Protocol


@dataclass
class RankSpec:
    """What to run for one rank, after planning."""

    rank: int
    host: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None


@dataclass
class ExitStatus:
    code: Optional[int]
    signal: Optional[int]

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


class Launcher(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    async def start(self, spec: RankSpec) -> RankHandle: ...

    async def aclose(self) -> None:
        """Release connections; called once after every rank has exited."""
        return None
