"""``orch run --stdin rank0|all``: the controller's own stdin, handed to the ranks.

mlx.launch forwards the terminal to the ranks so ``pdb`` and chat-style
scripts work; orch does too, without giving up the guard's teardown: the
bytes travel on each chosen rank's control channel as ``stdin <base64>``
lines, and end of file here becomes ``stdin-eof`` (the rank reads end of
file; nothing is stopped). See ``protocol.CONTROL_STDIN`` and the guard.

Why a thread: the event loop cannot watch every kind of stdin (epoll refuses
regular files and /dev/null), and a blocking ``read`` on a terminal cannot be
cancelled. So one daemon thread per process reads, and the loop takes its
chunks. The relay outlives an attempt: bytes read while a restart waits go to
the next attempt's ranks, and an end of file already seen is told to them at
once. At most ``max_waiting`` chunks wait unread here, and the supervisor
forwards no further than ``protocol.STDIN_WINDOW`` bytes ahead of what each
rank's guard says it has fed its rank, so ``cat big | orch run --stdin rank0``
to a slow reader holds the input back instead of piling it up in memory.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from typing import Optional

from orchestrator import protocol


class StdinRelay:
    def __init__(self, fd: int = 0, chunk: int = protocol.STDIN_CHUNK, max_waiting: int = 16):
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._chunk = chunk
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._ready = asyncio.Event()
        self._room = threading.Semaphore(max_waiting)
        threading.Thread(target=self._read, name="orch-stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            self._room.acquire()
            try:
                data = os.read(self._fd, self._chunk)
            except OSError:  # closed or unreadable stdin: the same as end of file
                data = b""
            try:
                self._loop.call_soon_threadsafe(self._put, data)
            except RuntimeError:  # the loop is closed: the run is over
                return
            if not data:
                return

    def _put(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
        else:
            self._eof = True
        self._ready.set()

    async def get(self) -> Optional[bytes]:
        """The next chunk of input; None at end of file (and every time after)."""
        while not self._chunks:
            if self._eof:
                return None
            self._ready.clear()
            await self._ready.wait()
        data = self._chunks.popleft()
        self._room.release()
        return data

    def unget(self, data: bytes) -> None:
        """Put a chunk back in front (an attempt ended before it could be forwarded)."""
        self._chunks.appendleft(data)
        self._ready.set()


def stdin_line(data: bytes) -> str:
    """One control line carrying ``data`` (at most ``STDIN_CHUNK`` bytes keeps it under 64 KiB)."""
    import base64

    return f"{protocol.CONTROL_STDIN} {base64.b64encode(data).decode('ascii')}"


def stdin_ranks(mode: str, world_size: int) -> tuple[int, ...]:
    """Which ranks read the controller's stdin: ``rank0``, ``all`` or ``none``."""
    if mode == "all":
        return tuple(range(world_size))
    if mode == "rank0":
        return (0,)
    return ()
