"""What a person watches while a run goes: progress, ETA, and a per-rank table.

On a terminal the block (a progress bar and one row per rank: step, loss,
samples/s, memory) is redrawn in place at the bottom of the screen, below the
ranks' own output; it is cleared before each output line and redrawn after,
at most a few times a second. When stderr is not a terminal (CI, a pipe) it
prints a plain progress line every ``plain_every_s`` seconds instead. It is
driven by events only: no timer wakes the controller while ranks are quiet.

It reads each rank's ``record`` (records.RankRecord: what the rank's events
said, folded once by the supervisor) and its ``status`` (the launcher's exit).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import IO, Optional
from orchestrator.units import human_bytes


def human_rate(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.1f}"


def fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None or seconds < 0 or seconds > 1e7:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _shares(states) -> dict[int, str]:
    """``--balance speed``: each rank's batch share as \"b (p%)\" of the global micro-batch; {} when not balancing."""
    known = {s.rank: s.record.batch_share for s in states}
    if not any(v is not None for v in known.values()):
        return {}
    total = sum(v for v in known.values() if v is not None) or 1
    return {r: (f"{v} ({100 * v / total:.0f}%)" if v is not None else "-") for r, v in known.items()}


class LiveView:
    def __init__(self, states, err: IO[str] = sys.stderr, tty: Optional[bool] = None, plain_every_s: float = 10.0,
                 redraw_every_s: float = 0.25):
        self.states = states
        self.err = err
        self.tty = err.isatty() if tty is None else tty
        self.plain_every_s = plain_every_s
        self.redraw_every_s = redraw_every_s
        self._drawn_lines = 0
        self._last_draw = 0.0
        self._last_plain = 0.0
        self._first_step_t: Optional[float] = None
        self._first_step: Optional[int] = None

    # ---- progress arithmetic ------------------------------------------------
    def progress(self) -> tuple[Optional[int], Optional[int], Optional[float]]:
        """(slowest rank's step, total steps, ETA seconds)."""
        recs = [s.record for s in self.states]
        steps = [r.steps for r in recs if r.steps is not None]
        totals = [r.total_steps for r in recs if r.total_steps]
        if not steps:
            return None, (totals[0] if totals else None), None
        step, total = min(steps), (totals[0] if totals else None)
        eta = None
        if total and self._first_step_t is not None and step > (self._first_step or 0):
            rate = (step - self._first_step) / max(1e-9, time.monotonic() - self._first_step_t)
            eta = (total - step) / rate if rate > 0 else None
        return step, total, eta

    def _lines(self) -> list[str]:
        step, total, eta = self.progress()
        width = max(40, min(shutil.get_terminal_size((100, 20)).columns, 120))
        if total:
            frac = min(1.0, (step or 0) / total)
            bar_w = max(10, width - 40)
            bar = "#" * int(frac * bar_w) + "-" * (bar_w - int(frac * bar_w))
            head = f"[{bar}] {step or 0}/{total} {frac:4.0%} ETA {fmt_eta(eta)}"
        else:
            head = f"step {step if step is not None else '-'}"
        shares = _shares(self.states)
        rows = [head, f"{'rank':>4} {'host':<14} {'step':>7} {'loss':>10} {'samples/s':>10} {'mlx peak':>10} {'rss peak':>10}"
                + (f" {'batch':>11}" if shares else "")]
        for s in self.states:
            r = s.record
            mem = r.memory
            status = ""
            if s.status is not None:
                status = "  done" if s.status.ok else "  FAILED"
            rows.append(
                f"{s.rank:>4} {r.host[:14]:<14} {r.steps if r.steps is not None else '-':>7} "
                f"{(f'{r.last_loss:.4g}' if r.last_loss is not None else '-'):>10} {human_rate(r.samples_per_s):>10} "
                f"{_mlx_bytes(mem, 'mlx_peak_bytes'):>10} {human_bytes(mem.rss_peak_bytes if mem else None):>10}"
                f"{(' ' + shares[s.rank].rjust(11)) if shares else ''}{status}"
            )
        return [r[:width] for r in rows]

    # ---- drawing ----------------------------------------------------------------
    def clear(self) -> None:
        """Remove the block so a rank's output line can be printed in its place."""
        if self.tty and self._drawn_lines:
            self.err.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def draw(self) -> None:
        if not self.tty:
            return
        lines = self._lines()
        self.err.write("\n".join(lines) + "\n")
        self.err.flush()
        self._drawn_lines = len(lines)
        self._last_draw = time.monotonic()

    def around_output(self):
        """Context for printing one output line under a live block."""
        view = self

        class _Ctx:
            def __enter__(self_inner):
                view.clear()

            def __exit__(self_inner, *exc):
                if view.tty and view._last_draw:
                    view.draw()

        return _Ctx()

    def on_event(self, state, payload: dict) -> None:
        if payload.get("kind") != "step":
            return
        now = time.monotonic()
        if self._first_step_t is None:
            self._first_step_t, self._first_step = now, payload.get("step")
        if self.tty:
            if now - self._last_draw >= self.redraw_every_s:
                self.clear()
                self.draw()
        elif now - self._last_plain >= self.plain_every_s or self._last_plain == 0.0:
            self._last_plain = now
            step, total, eta = self.progress()
            s = [x.record for x in self.states if x.record.last_loss is not None]
            loss = f" loss {s[0].last_loss:.4g}" if s else ""
            rate = f" {human_rate(s[0].samples_per_s)} samples/s" if s and s[0].samples_per_s else ""
            of = f"/{total}" if total else ""
            self.err.write(f"orch: step {step}{of}{loss}{rate} ETA {fmt_eta(eta)}\n")
            self.err.flush()

    def final_table(self) -> str:
        """The per-rank memory and throughput table printed when the run ends."""
        if not any(s.record.steps is not None or s.record.memory is not None for s in self.states):
            return ""
        shares = _shares(self.states)
        rows = [f"{'rank':>4} {'host':<14} {'steps':>6} {'last loss':>10} {'samples/s':>10} {'mlx peak':>10} "
                f"{'mlx active':>10} {'rss peak':>10} {'sys avail min':>13}" + (f" {'batch':>11}" if shares else "")]
        for s in self.states:
            r = s.record
            m = r.memory
            rows.append(
                f"{s.rank:>4} {r.host[:14]:<14} {r.steps if r.steps is not None else '-':>6} "
                f"{(f'{r.last_loss:.4g}' if r.last_loss is not None else '-'):>10} {human_rate(r.samples_per_s):>10} "
                f"{_mlx_bytes(m, 'mlx_peak_bytes'):>10} {_mlx_bytes(m, 'mlx_active_bytes'):>10} "
                f"{human_bytes(m.rss_peak_bytes if m else None):>10} {human_bytes(m.system_available_min_bytes if m else None):>13}"
                + ((' ' + shares[s.rank].rjust(11)) if shares else "")
            )
        return "\n".join(rows) + "\n"

    def end(self, summary, tail: list[str]) -> None:
        """What a person reads when an attempt ends: warnings, the table, why it failed (with the
        failed rank's last lines, ``tail``). The run's last line, its outcome over every attempt and
        its directory, is the driver's (``run/driver.py``)."""
        for w in summary.warnings:
            self.err.write(f"orch: warning: {w}\n")
        self.clear()
        table = self.final_table()
        if table:
            self.err.write(table)
        if summary.status == "failed":
            self.err.write(f"orch: run failed: {summary.reason}\n")
            if summary.diagnosis is not None:
                self.err.write(f"orch: diagnosis: {summary.diagnosis}\n")
            if tail:
                self.err.write(f"orch: last lines of rank {summary.failed_rank}:\n")
                for line in tail:
                    self.err.write(f"    {line}\n")
        elif summary.status == "interrupted":
            self.err.write("orch: run interrupted; all ranks stopped\n")
        self.err.flush()


def _mlx_bytes(memory, field: str) -> str:
    """An MLX memory figure, or ``-`` where the rank never reported one (a program that does not use
    MLX, seen only through its guard's RSS samples): MLX's own peak is never 0 once it ran."""
    if memory is None or not memory.mlx_peak_bytes:
        return "-"
    return human_bytes(getattr(memory, field))
