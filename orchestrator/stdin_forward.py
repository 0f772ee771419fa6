"""``--stdin``, one attempt's half: the relay's chunks to the chosen ranks, with flow control.

The relay (stdin_relay.py) reads the controller's stdin for the whole run;
this forwards it to one attempt's ranks as control lines, never more than
``protocol.STDIN_WINDOW`` bytes ahead of what each rank's guard says it has
fed its rank (``stdin_read`` events, which the supervisor hands to
:meth:`StdinForward.read`). End of file here is ``stdin-eof`` there (the rank
reads end of file and runs on); only the control channel's own end of file
stops a rank. Cancelled when the attempt ends: a chunk taken but not yet sent
goes back to the relay for the next attempt.
"""

from __future__ import annotations

import asyncio

from orchestrator import protocol


class StdinForward:
    def __init__(self, relay, states: list):
        self.relay = relay
        self.targets = states  # RankState of each rank that reads the input
        self._sent = {s.rank: 0 for s in states}
        self._read: dict[int, int] = {}  # bytes each rank's guard has fed it
        self._closed: set[int] = set()  # ranks whose stdin is closed
        self._more = asyncio.Event()

    def read(self, rank: int, nbytes: int, closed: bool) -> None:
        """A guard's ``stdin_read`` event: how far its rank has read, and whether it closed its stdin."""
        self._read[rank] = max(self._read.get(rank, 0), nbytes)
        if closed:
            self._closed.add(rank)
        self._more.set()

    def _reading(self, s) -> bool:
        return s.handle is not None and not s.exited.is_set()

    async def run(self) -> None:
        from orchestrator.stdin_relay import stdin_line

        while True:
            data = await self.relay.get()
            if data is not None:
                try:
                    await self._room()
                except asyncio.CancelledError:  # the attempt ended: this chunk is the next attempt's
                    self.relay.unget(data)
                    raise
            line = protocol.CONTROL_STDIN_EOF if data is None else stdin_line(data)
            for s in self.targets:
                if self._reading(s):
                    s.handle.forward_stdin(line)
                    self._sent[s.rank] += len(data or b"")
            if data is None:
                return

    async def _room(self) -> None:
        """Wait until no rank that still reads has STDIN_WINDOW bytes it has not been fed;
        rechecked every second, so a rank that exits frees the others."""
        while True:
            full = [s for s in self.targets if self._reading(s) and s.rank not in self._closed
                    and self._sent[s.rank] - self._read.get(s.rank, 0) >= protocol.STDIN_WINDOW]
            if not full:
                return
            self._more.clear()
            try:
                await asyncio.wait_for(self._more.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
