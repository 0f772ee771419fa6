"""The guard's end of the control channel: its stdin, read as lines.

One stream carries everything the controller says to a rank's guard (an SSH
channel has only one stdin): the token line (``--token-line``, before the rank
starts), a ``--deferred`` guard's configuration line, the control words
(``go``, ``release``, ``dump``: the guard's loop dispatches them) and, with
``ORCH_STDIN=pipe`` (``orch run --stdin``), the program's own input as
``stdin <base64>`` lines and ``stdin-eof``. User bytes only ever arrive
base64-encoded, so they cannot pass for a control word and the channel's own
end of file still means "stop".

``RankInput`` is the rank's side of ``--stdin``: it decodes ``stdin`` lines
into a pipe that is the rank's stdin, never blocking the guard's loop (what
the rank has not read yet waits in memory), and reports what it wrote as
``stdin_read`` events, the controller's flow control.

Standard library only: the guard imports this under ``python -S``.
"""

from __future__ import annotations

import binascii
import json
import os
import select
import selectors
import time
from typing import Callable, Optional

from orchestrator import protocol


def read_line(fd: int, timeout_s: float, buf: bytes = b"", stop=lambda: False) -> tuple[Optional[bytes], bytes]:
    """The first line on ``fd`` (after what ``buf`` already holds) and whatever followed it.

    None when the line does not come within ``timeout_s``, on end of file, or once ``stop()``.
    """
    end = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or stop():
            return None, b""
        try:
            ready = select.select([fd], [], [], min(left, 0.25))[0]
        except InterruptedError:
            continue
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, b""
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return line + b"\n", rest


def valid_token(token: object) -> bool:
    return isinstance(token, str) and 0 < len(token) <= 256 and all(c in "0123456789abcdefABCDEF" for c in token)


def parse_token_line(line: Optional[bytes]) -> Optional[str]:
    if line is None:
        return None
    word, _, token = line.decode(errors="replace").strip().partition(" ")
    token = token.strip()
    return token if word == protocol.CONTROL_TOKEN and valid_token(token) else None


def parse_config_line(line: Optional[bytes]) -> tuple[Optional[dict], Optional[str], Optional[str]]:
    """A ``--deferred`` guard's configuration line: (the configuration without its token, the token, a problem).

    The problem is one line for stderr; (None, None, None) when no line came
    (the controller gave up or died before configuring us: nothing to say).
    """
    if line is None:
        return None, None, None
    try:
        config = json.loads(line)
    except ValueError:
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("env"), dict):
        return None, None, "the configuration line is not a JSON object with \"env\""
    token = config.pop(protocol.TOKEN_FIELD, None)
    if token is not None and not valid_token(token):
        return None, None, "the configuration's \"token\" is not a hex string"
    return config, token, None


class RankInput:
    """``orch run --stdin``: the write end of the rank's stdin pipe, and what the rank has not read yet."""

    def __init__(self, write_fd: Optional[int], emit: Callable[..., None]) -> None:
        self.write_fd = write_fd  # None: the rank's stdin is /dev/null
        self.emit = emit
        self.pending = bytearray()
        self.eof = False
        self.fed = 0  # bytes written into the rank's stdin so far
        self.told = 0  # ... as last reported to the controller (stdin_read: its flow control)

    def take_line(self, cmd: bytes) -> bool:
        """``stdin <base64>`` / ``stdin-eof`` (``orch run --stdin``): True if ``cmd`` was one.

        Bytes arriving when the rank has no stdin pipe, or after its input ended,
        are dropped; a line that is not valid base64 is dropped too.
        """
        word, _, data = cmd.strip().partition(b" ")
        if word == protocol.CONTROL_STDIN_EOF.encode():
            self.eof = True
            return True
        if word != protocol.CONTROL_STDIN.encode():
            return False
        if self.write_fd is not None and not self.eof:
            try:
                self.pending += binascii.a2b_base64(data)
            except (binascii.Error, ValueError):
                pass
        return True

    def feed(self, sel: selectors.BaseSelector) -> None:
        """Write what the rank has not read yet, without blocking; close its stdin after ``stdin-eof``.

        Registered for writing (as "feed") only while something waits, so the
        loop sleeps when the rank is not reading. EPIPE (the rank closed its
        stdin or is gone) drops the rest.
        """
        if self.write_fd is None:
            return
        while self.pending:
            try:
                n = os.write(self.write_fd, self.pending[:65536])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.pending.clear()
                self.eof = True
                break
            del self.pending[:n]
            self.fed += n
        if self.fed - self.told >= protocol.STDIN_ACK_EVERY:  # (the window is 16 of these)
            self.told = self.fed
            self.emit("stdin_read", bytes=self.fed, closed=False)
        registered = self.write_fd in sel.get_map()
        if self.eof and not self.pending:
            if registered:
                sel.unregister(self.write_fd)
            os.close(self.write_fd)
            self.write_fd = None
            self.emit("stdin_read", bytes=self.fed, closed=True)  # the controller stops waiting for us
        elif self.pending and not registered:
            sel.register(self.write_fd, selectors.EVENT_WRITE, "feed")
        elif not self.pending and registered:
            sel.unregister(self.write_fd)
