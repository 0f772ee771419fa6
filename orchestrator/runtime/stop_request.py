"""SIGTERM as a request to stop at the next step boundary, with a final checkpoint if there is time.

When orch stops a run (Ctrl-C, SIGTERM to orch, a failed peer) each rank's guard sends
SIGTERM and, ``--grace`` seconds later (``ORCH_GRACE_S``), SIGKILL. Python runs a signal
handler only between bytecodes, so a rank inside ``mx.eval`` finishes that step first; the
trainer then asks ``final_checkpoint_fits`` whether the checkpoint it would write can be
finished before the SIGKILL (its estimate: the last save's duration, else the bytes at a
conservative disk rate). If it fits, rank 0 writes it (atomically, as every checkpoint),
and it ends by the same SIGTERM it received, so the launcher sees what it always saw. The
ranks' signals come at different moments (one guard each; over SSH, milliseconds apart), so a
rank does not stop on its own signal: its flag rides the next step's all-reduce beside the
loss, and every rank stops at the boundary after the first step that carried one
(``TrainStep.train_step``). The others end as rank 0 saves. If it does not fit, or the signal came while the rank was blocked where no
boundary comes (a collective whose peer is gone), the last complete checkpoint stays the
latest and the SIGKILL ends the rank as before. Outside orch (no ``ORCH_GRACE_S``) nothing
is installed: SIGTERM keeps Python's default.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

from orchestrator import protocol

DISK_BYTES_PER_S = 200e6  # a conservative write rate for the first save's estimate
SAVE_OVERHEAD_S = 0.05  # fsyncs and renames of a checkpoint directory
MARGIN = 0.8  # use at most this share of the time left before the SIGKILL


class StopRequest:
    """Whether a stop was asked for, when, and how long until the guard's SIGKILL."""

    def __init__(self, grace_s: Optional[float] = None) -> None:
        if grace_s is None:
            raw = os.environ.get(protocol.ENV_GRACE_S)
            grace_s = float(raw) if raw else None
        self.grace_s = grace_s
        self.asked_at: Optional[float] = None
        self.installed = False

    def arm(self) -> None:
        """Take SIGTERM over (the training loop begins): only under orch, only from the main thread."""
        if self.grace_s is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)
            self.installed = True

    def release(self) -> None:
        """The loop is over: SIGTERM ends the rank at once again (a stop asked for now is just that)."""
        if self.installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.installed = False
            if self.asked_at is not None:
                self.end()

    def _handler(self, signum, frame) -> None:
        if self.asked_at is None:
            self.asked_at = time.monotonic()

    def by_peer(self) -> None:
        """Another rank was asked to stop first (its flag came with the all-reduce): this rank's own SIGTERM
        and its grace are moments away, so the grace is counted from now, not from a signal not yet here."""
        if self.asked_at is None:
            self.asked_at = time.monotonic()

    @property
    def pending(self) -> bool:
        return self.asked_at is not None

    def time_left(self, now: Optional[float] = None) -> float:
        if self.asked_at is None or self.grace_s is None:
            return float("inf")
        return self.grace_s - ((time.monotonic() if now is None else now) - self.asked_at)

    def final_checkpoint_fits(self, nbytes: int, last_save_s: Optional[float], now: Optional[float] = None) -> bool:
        """Whether a checkpoint of ``nbytes`` (taking ``last_save_s`` last time) ends before the SIGKILL."""
        needed = last_save_s if last_save_s is not None else nbytes / DISK_BYTES_PER_S + SAVE_OVERHEAD_S
        return needed <= MARGIN * self.time_left(now)

    def end(self) -> None:
        """End the rank by the SIGTERM it was sent (the default action), as if no handler had been there."""
        self.installed = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal is delivered before this returns; never reached
        os._exit(128 + signal.SIGTERM)
