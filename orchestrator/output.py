"""A rank's output on its way to the log, the console and the event handler.

One :class:`LineOut` per output stream of a rank takes the bytes a pump reads,
splits them into lines, hands protocol events to the supervisor, writes
everything else to the rank's log (every byte) and to the console (each line
as a terminal would show it, cut when it is very long), and keeps the rank's
tail for diagnoses. :class:`Console` is a console stream that survives its
reader going away (``orch run ... | head``).

The supervisor is this module's only client; it is reached through the few
methods named in :class:`OutputOwner`.
"""

from __future__ import annotations

import os
import time
from typing import IO, TYPE_CHECKING, Protocol

from orchestrator import programs, protocol
from orchestrator.launch.base import READ_CHUNK, LineSplitter
from orchestrator.units import human_bytes

if TYPE_CHECKING:
    from orchestrator.rundir import RunDir

CONSOLE_LINE_MAX = 16 * 1024  # bytes of one output line shown on the console; the log keeps all


class OutputOwner(Protocol):
    """What a LineOut needs of the supervisor."""

    rundir: "RunDir"
    echo: bool
    live: object  # LiveView: ``around_output()``

    def on_rank_event(self, state, payload: dict) -> None: ...
    def activity(self) -> None: ...
    def note(self, text: str) -> None: ...
    def write_failed(self, path, exc: BaseException) -> None: ...


class Console:
    """A console stream that outlives its reader.

    ``orch run ... | head -3`` closes our stdout: a write then raises
    BrokenPipeError. From then on this stream is quiet (the ranks' output
    is still logged and the run ends normally), and the file descriptor is
    pointed at /dev/null so Python's own flush at exit cannot print a
    traceback either. Any other write error (a full disk behind a redirect,
    a closed terminal) is treated the same way: the console is a view, the
    logs are the record.
    """

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(text)
        except (OSError, ValueError):
            self._broke()

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self._broke()

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    def _broke(self) -> None:
        self.broken = True
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, AttributeError):
            return  # not a real file (a StringIO): nothing will flush it at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        except OSError:
            pass


class LineOut:
    """One output stream of one rank: pieces of lines in; events, log bytes, console lines and the tail out.

    The log gets every byte the rank wrote (event lines excepted), written with
    ``os.write`` so a failing disk raises here, where it is handled, and never
    later from a buffer at close. The console gets each line once it is
    complete: what a terminal would show of it (the text after its last ``\\r``)
    and, for a line over ``CONSOLE_LINE_MAX``, a cut with a note where the whole is.
    """

    def __init__(self, sup: OutputOwner, state, console: Console):
        self.sup = sup
        self.state = state
        self.console = console
        self.prefix = f"[{state.rank}] "
        self.size = 0  # bytes of the current line already passed on in pieces
        self.head = bytearray()  # its first CONSOLE_LINE_MAX bytes
        self.last = bytearray()  # and its last ones (where a \r progress bar's latest state is)
        self.log_ok = True
        self._log(b"")  # every rank has a log, even one that printed nothing

    def _grow(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.head) < CONSOLE_LINE_MAX:
            self.head += data[:CONSOLE_LINE_MAX - len(self.head)]
        self.last += data[-CONSOLE_LINE_MAX:]
        del self.last[:-CONSOLE_LINE_MAX]

    def pieces(self, pieces: list[tuple[bytes, bool]]) -> None:
        log = bytearray()
        shown: list[str] = []
        for piece, ends in pieces:
            if not ends:
                self._grow(piece)
                log += piece
                continue
            text, payload = protocol.split_line(piece.decode("utf-8", "surrogateescape"))
            if payload is not None:
                self.state.program.note_event(payload)
                self._event(payload)
                # The event ended its own line, not the rank's: what came before it (a line the rank
                # is in the middle of, when the guard wrote the event) goes on with what comes next.
                if text:
                    part = text.encode("utf-8", "surrogateescape")
                    self._grow(part)
                    log += part
                continue
            # The parser sees the whole line, also its part held since a guard event landed inside it.
            held = bytes(self.head).decode("utf-8", "surrogateescape") if 0 < self.size <= CONSOLE_LINE_MAX else ""
            for fields in self.state.program.feed(held + (text or "")):  # e.g. mlx-lm's "iter train_loss" rows
                self._event({**fields, "rank": self.state.rank, "t": time.time(), "source": "output"})
            # Colour codes (rich forces them on even into a pipe) are dropped from the log and the console.
            data = programs.strip_ansi(text or "").encode("utf-8", "surrogateescape")
            if not data.endswith(b"\n"):
                data += b"\n"
            log += data
            shown.append(self._line(data))
        if log:
            self.sup.activity()
        self._log(bytes(log))
        self._show(shown)

    def _event(self, payload: dict) -> None:
        try:
            self.sup.on_rank_event(self.state, payload)
        except Exception as e:  # a bad event must never stop the output of a rank
            self.sup.note(f"orch: ignoring an event from rank {self.state.rank} that could not be handled: {e!r}\n")

    def _line(self, data: bytes) -> str:
        """The complete line ``data`` ends as the console shows it (and the tail keeps it)."""
        if self.size + len(data) <= CONSOLE_LINE_MAX:  # short: whole, also when it came in parts
            text, cut = _visible((bytes(self.head) + data).decode("utf-8", "replace")), ""
            self.size = 0
            self.head.clear()
            self.last.clear()
        else:
            self._grow(data)
            where = self.sup.rundir.rank_log(self.state.rank)
            try:
                where = where.relative_to(self.sup.rundir.path)
            except ValueError:
                pass
            bar = b"\r" in self.last.rstrip(b"\r\n")
            text = _visible((self.last if bar else self.head).decode("utf-8", "replace"))
            cut = f" … [cut: {human_bytes(self.size)}, full line in {where}]"
            self.size = 0
            self.head.clear()
            self.last.clear()
        line = text + cut
        self.state.tail.append(line)
        return line

    def _log(self, data: bytes) -> None:
        if not self.log_ok:
            return
        path = self.sup.rundir.rank_log(self.state.rank)
        try:
            fd = self.sup.rundir.log(self.state.rank).fileno()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except Exception as e:  # disk full, file gone: a clear failure, and the output keeps draining
            self.log_ok = False
            self.sup.write_failed(path, e)

    def _show(self, lines: list[str]) -> None:
        if not lines or not self.sup.echo or self.console.broken:
            return
        with self.sup.live.around_output():
            self.console.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.console.flush()


def _visible(text: str) -> str:
    """What a terminal shows of one line: no newline, only the text after its last carriage return."""
    text = text.rstrip("\n")
    if text.endswith("\r"):
        text = text.rstrip("\r")
    if "\r" in text:
        segments = [seg for seg in text.split("\r") if seg]
        text = segments[-1] if segments else ""
    return text


async def pump(sup: OutputOwner, state, stream, echo_to: Console) -> None:
    """Copy one output stream of a rank to its log and the console, and take its events.

    A pump never dies before end of file: whatever goes wrong with one line
    (a bad event, a closed console, a full disk) is handled and the pump reads
    on, because a rank whose pipe is not drained blocks forever on a write.
    Lines have no length limit in the log; the console shows an over-long
    line cut, with a note saying where the whole line is.
    """
    out = LineOut(sup, state, echo_to)
    lines = LineSplitter()
    while True:
        try:
            chunk = await stream.read(READ_CHUNK)
        except Exception:  # the stream broke (connection lost): nothing more will come
            chunk = b""
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8", "surrogateescape")
        try:
            pieces = lines.feed(chunk) if chunk else lines.end()
            if not chunk and not pieces and out.size:
                pieces = [(b"", True)]  # end of file inside a line (held since an event): the line ends
            out.pieces(pieces)
        except Exception as e:  # never reached by design; still, the pump must go on
            sup.note(f"orch: output of rank {state.rank} could not be handled: {e!r}\n")
        if not chunk:
            return
