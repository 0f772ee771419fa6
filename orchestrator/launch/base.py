"""The one small interface every way of starting ranks implements.

Shaped after DeepSpeed's multinode runners and torch elastic's process
context: a launcher knows how to start one rank (under the guard) and hands
back a handle with the rank's output streams, a way to ask it to stop, and
its exit status; where the guard has a private channel (local pipes, SSH),
the handle is also a ``ControlChannel`` for control lines (gate, hold,
stack dumps, --stdin). Everything else — output
routing, events, failure policy — lives in the supervisor, once.
"""

from __future__ import annotations

import abc
import secrets
import signal as _signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from orchestrator import protocol

# The guard flag that makes it read ``token <hex>`` as its first control line.
TOKEN_LINE_FLAG = "--token-line"


def new_token() -> str:
    """A fresh secret for one rank handle of one attempt (see ``protocol.GUARD_KINDS``)."""
    return secrets.token_hex(16)


def token_line(token: str) -> str:
    """The first control line a guard started with ``--token-line`` reads (no newline)."""
    return f"{protocol.CONTROL_TOKEN} {token}"


def signal_name(sig: Optional[int] = None, name: Optional[str] = None) -> str:
    """A readable name for any signal, never an exception: "SIGTRAP", "signal 77".

    ``name`` is what a transport reports instead of a number (OpenSSH sends
    "TRAP", "SIGBUS", or "SIG@openssh.com" for a signal without a POSIX
    name): a known name is normalised, anything else is quoted as reported.
    The one place the controller turns signals into words.
    """
    if name:
        bare = str(name).strip().upper().removeprefix("SIG")
        if bare and bare.isalnum():
            return "SIG" + bare
        return f"a signal reported as {name!r}"
    if sig is None:
        return "an unknown signal"
    try:
        return _signal.Signals(sig).name
    except (ValueError, TypeError):
        return f"signal {sig}"


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
    program: str = "script"  # "script" (a file), "module" (python -m), "command" (any executable)
    # --resume-arg on a restart: the template's words ({latest} still in them) and the local file
    # found for them. Each launcher gives the path its rank can read (SSH: that host's copy).
    resume_words: list[str] = field(default_factory=list)
    resume_file: Optional[str] = None

    def program_argv(self, script: Optional[str] = None, resume_path: Optional[str] = None) -> list[str]:
        """What the bootstrap runs: ``SCRIPT ARGS``, ``-m MODULE ARGS`` or ``--exec PROGRAM ARGS``."""
        flag = {"script": [], "module": ["-m"], "command": ["--exec"]}[self.program]
        resume = []
        if self.resume_file and self.resume_words:
            resume = [w.replace("{latest}", resume_path or self.resume_file) for w in self.resume_words]
        return [*flag, script or self.script, *self.script_args, *resume]

    def rank_argv(self, python: str, script: Optional[str] = None, guard_flags: tuple[str, ...] = (),
                  resume_path: Optional[str] = None) -> list[str]:
        """The guarded command line of this rank.

        The guard runs with ``-S`` (no site-packages: it needs only the standard
        library and ``orchestrator`` from PYTHONPATH), which saves every rank the
        cost of site's .pth hooks before the rank itself can start.
        """
        return [python, "-S", "-m", "orchestrator.runtime.guard", *guard_flags, "--",
                python, "-m", "orchestrator.runtime.bootstrap", *self.program_argv(script, resume_path)]


@dataclass
class ExitStatus:
    code: Optional[int]
    signal: Optional[int]
    reason: Optional[str] = None  # set by a launcher that knows more, e.g. "SSH connection to mac2 lost"
    signal_label: Optional[str] = None  # the signal's name as a transport reported it (SSH), when it had no number here

    @classmethod
    def from_returncode(cls, rc: int) -> "ExitStatus":
        """A subprocess return code: negative means killed by that signal."""
        return cls(code=None, signal=-rc) if rc < 0 else cls(code=rc, signal=None)

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.signal is None

    @property
    def how(self) -> str:
        """"killed by SIGTRAP" / "exited with code 3": for any signal number or name."""
        if self.signal is not None or self.signal_label:
            return f"killed by {signal_name(self.signal, self.signal_label)}"
        return f"exited with code {self.code}"

    @property
    def shell_code(self) -> int:
        """The status as a shell reports it: the code, or 128+signal."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 1


class LineReader(Protocol):
    async def readline(self) -> bytes | str: ...

    async def read(self, n: int = -1) -> bytes: ...


READ_CHUNK = 64 * 1024
MAX_PIECE = 1 << 20  # bytes of one unterminated line held before it is passed on in pieces
_MARKER = protocol.MARKER.encode()


class LineSplitter:
    """Bytes in, lines out, with no limit on a line's length and without losing a byte.

    ``feed`` returns ``(piece, ends_line)`` pairs: every complete line (with its
    newline), and, when a line grows past ``max_piece`` without one, the part
    so far as a piece that does not end the line. An over-long piece is cut
    just before an event marker if one follows (an event the guard writes
    after a rank's unterminated output stays a line of its own), and a few
    bytes are kept back so a marker split across reads is still found.
    Why: ``StreamReader.readline`` drops a line over its limit, and a tqdm bar
    (``\r`` without ``\n``) is one endless line.
    """

    def __init__(self, max_piece: int = MAX_PIECE):
        self.buf = bytearray()
        self.max_piece = max_piece

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        self.buf += data
        out: list[tuple[bytes, bool]] = []
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                out.append((bytes(self.buf[start:i + 1]), True))
                start = i + 1
                continue
            if len(self.buf) - start <= self.max_piece:
                break
            m = self.buf.find(_MARKER, start + 1)
            cut = m if m > start else len(self.buf) - (len(_MARKER) - 1)
            out.append((bytes(self.buf[start:cut]), False))
            start = cut
            if m < 0:
                break
            # from the marker on, look again for the newline that ends the event
        del self.buf[:start]
        return out

    def end(self) -> list[tuple[bytes, bool]]:
        """The unterminated rest at end of file, as a last line."""
        rest, self.buf = bytes(self.buf), bytearray()
        return [(rest, True)] if rest else []


class RankHandle(abc.ABC):
    rank: int
    host: str
    stdout: LineReader
    stderr: LineReader
    rank_pid: Optional[int] = None  # the trainer's pid, from the guard's authenticated "spawned" event
    # The secret the guard got on its stdin (or in its configuration line) for this
    # attempt; only events carrying it may come from the guard. None: the guard has
    # no private channel (mpirun), so no pid it reports is ever used.
    token: Optional[str] = None

    def forward_stdin(self, line: str) -> None:
        """``--stdin``: one framed line of orch's input (``stdin <base64>`` / ``stdin-eof``) for this rank.

        Over the guard's control channel where there is one; a launcher whose
        ranks get their input another way (mpirun forwards its own stdin to
        rank 0) overrides this.
        """
        if isinstance(self, ControlChannel):
            self.send_control(line)

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask the rank to stop: the guard terminates its process group."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Last resort when the guard itself does not react in time."""

    @abc.abstractmethod
    async def wait(self) -> ExitStatus: ...


class ControlChannel(abc.ABC):
    """A rank whose guard reads control lines on a private channel: its stdin (local pipes, SSH).

    The ring start's ``go``/``release`` and the hang diagnosis's ``dump`` go
    only to such ranks. Under mpirun a guard has no channel of its own
    (mpirun forwards stdin to rank 0 only, and only the program's input), so
    an MPI rank is not one: no rank of an mpi job is gated or held, and its
    stacks are not asked for.
    """

    @abc.abstractmethod
    def send_control(self, line: str) -> None:
        """Write one control line (``protocol.CONTROL_*``, no newline) to the guard; never raises."""


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

    async def collect(self, run_dir: "Path") -> None:
        """After supervision, whatever the outcome: bring the ranks' results into ``run_dir``.

        A stage of its own (``job.py`` calls it between supervising and closing). Local
        ranks wrote there already, and mpirun stages and collects nothing (remote ranks
        write ORCH_RUN_DIR at the same path on their host; a shared filesystem brings
        it home): a no-op for both. Over SSH: checkpoints and files home, sites retired.
        """
        return None

    async def aclose(self) -> None:
        """Release connections; called once after every rank has exited (after ``collect``)."""
        return None
