"""What the user sees while a stage runs and when it ends.

On a terminal: one bar per host (bytes that reached it of what the pass sends, and its
receive rate over the last second), redrawn in place on stderr. Otherwise (CI, a pipe): one
plain line every ``PLAIN_EVERY_S`` seconds. At the end: bytes moved per host, wall time, GB/s
(``summary_text``), or the same as JSON (``--json``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional, TextIO

from pydantic import Field

from orchestrator.schema import Model
from orchestrator.units import human_bytes as fmt_bytes

PLAIN_EVERY_S = 5.0
REDRAW_S = 0.2
BAR = 24


class HostResult(Model):
    """One host's part in a stage."""

    host: str
    status: str = "ok"                  # ok | gone (vanished during the stage) | unreachable | failed
    reason: Optional[str] = None
    bytes_received: int = 0             # bytes that reached it over the network (it forwarded them on)
    bytes_written: int = 0              # bytes it wrote to its disk
    files_written: int = 0
    files_skipped: int = 0              # already there with the right SHA-256
    files_replaced: list[str] = Field(default_factory=list)  # there, but damaged: written anew
    resumed_bytes: int = 0              # bytes an interrupted stage had left, not sent again
    missing: list[str] = Field(default_factory=list)          # files it still lacks at the end
    gb_per_s: Optional[float] = None    # bytes_received / the seconds it spent in passes
    relay_cpu_s: Optional[float] = None # what the relay cost the host: CPU seconds (user + system)
    checked: Optional[str] = None       # how DEST was checked: "sftp" (every file as the relay last verified it:
                                        # no relay started), "relay" (its records, else hashed), "verify" (hashed)


class StageSummary(Model):
    status: str                         # ok | partial (some host failed) | failed
    src: str
    dest: str
    files: int
    bytes: int                          # size of the source
    sent_by_controller: int             # what left the controller (once, not once per host)
    wall_s: float
    gb_per_s: float                     # bytes that reached every host's disk, summed / wall_s
    passes: int
    hosts: list[HostResult]
    route: list[str] = Field(default_factory=list)            # the last pass's hops, e.g. "host1 -> host2 at 10.0.1.2 (ring)"
    phases: dict[str, float] = Field(default_factory=dict)  # connect_s, scan_s, transfer_s, close_s: where the time went

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "ok" else 1


class Progress:
    """Per-host counters fed by the relays' reports; draws bars (terminal) or plain lines."""

    def __init__(self, names: list[str], stream: TextIO, *, tty: Optional[bool] = None, enabled: bool = True):
        self.names = names
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.enabled = enabled
        self.rx = {n: 0 for n in names}
        self.base = {n: 0 for n in names}
        self.expect = {n: 0 for n in names}
        self.hist = {n: deque(maxlen=64) for n in names}
        self.first_rx: dict[str, float] = {}
        self.last_rx: dict[str, float] = {}
        self.state: dict[str, str] = {}
        self._drawn = 0
        self._last_draw = 0.0
        self._last_plain = time.monotonic()

    def start_pass(self, expect: dict[str, int]) -> None:
        for n in self.names:
            self.base[n] = self.rx[n]
            self.expect[n] = expect.get(n, 0)
            if n in expect:
                self.state.pop(n, None)

    def update(self, name: str, rx: int) -> None:
        now = time.monotonic()
        if rx != self.rx[name]:
            self.first_rx.setdefault(name, now)
            self.last_rx[name] = now
        self.rx[name] = rx
        self.hist[name].append((now, rx))
        self.tick()

    def mark(self, name: str, state: str) -> None:
        """A host's state in words instead of its rate ("done", "gone"); plain output prints only failures at once."""
        self.state[name] = state
        self.tick(force=self.tty or state in ("gone", "unreachable", "failed"))

    def rate(self, name: str) -> float:
        h = self.hist[name]
        now = time.monotonic()
        while len(h) > 2 and now - h[0][0] > 1.0:
            h.popleft()
        if len(h) < 2 or h[-1][0] <= h[0][0]:
            return 0.0
        return (h[-1][1] - h[0][1]) / max(now - h[0][0], 1e-3)

    def line(self, name: str) -> str:
        done = self.rx[name] - self.base[name]
        total = self.expect[name]
        state = self.state.get(name)
        frac = 1.0 if state == "done" else (min(1.0, done / total) if total else 0.0 if state else 1.0)
        if state:
            tail = state
        else:
            tail = f"{fmt_bytes(done)} / {fmt_bytes(total)}  {fmt_bytes(self.rate(name))}/s"
        fill = int(frac * BAR)
        return f"  {name:<14} [{'#' * fill}{'.' * (BAR - fill)}] {frac * 100:5.1f}%  {tail}"

    def tick(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_draw < REDRAW_S:
                return
            self._last_draw = now
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            lines = [self.line(n) for n in self.names]
            self.stream.write(up + "".join(f"\x1b[2K{l}\n" for l in lines))
            self.stream.flush()
            self._drawn = len(lines)
        elif force or now - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = now
            parts = []
            for n in self.names:
                done, total = self.rx[n] - self.base[n], self.expect[n]
                pct = 100.0 * min(1.0, done / total) if total else 100.0
                parts.append(f"{n} {self.state.get(n) or f'{pct:.0f}% {fmt_bytes(self.rate(n))}/s'}")
            self.stream.write("orch stage: " + ", ".join(parts) + "\n")
            self.stream.flush()

    def seconds_receiving(self, name: str) -> Optional[float]:
        if name not in self.first_rx:
            return None
        return max(self.last_rx[name] - self.first_rx[name], 1e-3)


def summary_text(s: StageSummary) -> str:
    head = (f"orch stage: {s.files} files, {fmt_bytes(s.bytes)} -> {s.dest} on {len(s.hosts)} host{'s' if len(s.hosts) != 1 else ''} in "
            f"{s.wall_s:.2f}s ({s.gb_per_s:.3f} GB/s onto disks; {fmt_bytes(s.sent_by_controller)} left this machine)")
    rows = [head]
    if s.route:
        rows.append("  route: " + "; ".join(s.route))
    for h in s.hosts:
        rate = f"{h.gb_per_s:.3f} GB/s" if h.gb_per_s else "-"
        row = (f"  {h.host:<14} {h.status:<11} received {fmt_bytes(h.bytes_received):>10}  wrote "
               f"{fmt_bytes(h.bytes_written):>10} ({h.files_written} files, {h.files_skipped} already there"
               + (f", {len(h.files_replaced)} damaged and replaced" if h.files_replaced else "")
               + (f", {fmt_bytes(h.resumed_bytes)} resumed" if h.resumed_bytes else "") + f")  {rate}")
        rows.append(row)
        if h.reason:
            rows.append(f"    {h.reason}")
    return "\n".join(rows)
