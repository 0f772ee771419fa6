"""``orch runs``: one line per run directory, newest first, read cheaply.

A run with a summary.json costs one small read; one without (still going, or
its controller was killed) costs its first event line and the tail of its
events.jsonl, so listing a directory of long runs stays fast.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator import rundir
from orchestrator.report.data import event_time, iso, parse_lines, read_events, read_json, summary_from_events, unfinished_status
from orchestrator.report.tables import derived, human_duration, loss_cell, num, text_table

TAIL_BYTES = 256 * 1024  # how much of events.jsonl `orch runs` reads for a run without a summary


@dataclass
class RunRow:
    path: Path
    status: str
    world_size: Optional[int]
    steps: Optional[int]
    duration_s: Optional[float]
    final_loss: Optional[float]
    script: Optional[str]
    started: Optional[float]  # UNIX time, for sorting and display
    diverged_at_step: Optional[int] = None  # the first step a rank's loss was NaN/inf


def _parse_started(s) -> Optional[float]:
    if not isinstance(s, str):
        return None
    try:
        return _dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc).timestamp()
    except ValueError:
        return None


def _first_event_time(path: Path) -> Optional[float]:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            events = parse_lines(f.readline())
    except OSError:
        return None
    return event_time(events[0]) if events else None


def read_row(run_dir: Path) -> Optional[RunRow]:
    """One line of `orch runs`, cheaply: summary.json, else the first line and tail of events.jsonl."""
    summary = read_json(run_dir / rundir.SUMMARY)
    events_path = run_dir / rundir.EVENTS
    if summary is None:
        if not events_path.is_file():
            return None
        tail = read_events(events_path, TAIL_BYTES)
        summary = summary_from_events(tail, read_json(run_dir / rundir.PLAN), unfinished_status(events_path))
        first = _first_event_time(events_path)
        last = max((t for t in map(event_time, tail) if t is not None), default=None)
        if first is not None and last is not None:  # the tail alone underestimates how long it has been going
            summary["duration_s"], summary["started_at"] = round(last - first, 3), iso(first)
    d = derived(summary)
    started = _parse_started(summary.get("started_at")) or _first_event_time(events_path)
    if started is None:
        try:
            started = run_dir.stat().st_mtime
        except OSError:
            started = None
    script = summary.get("script")
    return RunRow(path=run_dir, status=str(summary.get("status", "?")), world_size=summary.get("world_size"),
                  steps=d["steps"], duration_s=summary.get("duration_s"), final_loss=d["final_loss"],
                  script=Path(script).name if isinstance(script, str) else None, started=started,
                  diverged_at_step=d["diverged_at_step"])


def list_runs(root: str | Path = "runs") -> list[RunRow]:
    """Every run directory directly under ``root`` (or ``root`` itself if it is one), newest first."""
    root = Path(root)
    if rundir.is_run_dir(root):
        dirs = [root]
    else:
        dirs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    rows = [r for r in map(read_row, dirs) if r is not None]
    return sorted(rows, key=lambda r: r.started or 0.0, reverse=True)


def _display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def format_runs(rows: list[RunRow]) -> str:
    headers = ["started", "status", "ranks", "steps", "duration", "loss", "script", "path"]
    table = [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)) if r.started else "-", r.status,
              num(r.world_size, "{}"), num(r.steps, "{}"), human_duration(r.duration_s),
              loss_cell(r.final_loss, r.diverged_at_step),
              r.script or "-", _display_path(r.path)] for r in rows]
    return text_table(headers, table)



def cmd_runs(root: str = "runs", limit: int = 20) -> int:
    """`orch runs [DIR]`: the newest ``limit`` runs under DIR, one line each."""
    if not Path(root).is_dir():
        sys.stderr.write(f"orch: error: {root}: no such directory (run directories live under runs/ by default)\n")
        return 2
    rows = list_runs(root)
    if not rows:
        print(f"no runs under {root}")
        return 0
    print(format_runs(rows[:limit] if limit and limit > 0 else rows))
    if limit and 0 < limit < len(rows):
        print(f"({len(rows) - limit} older runs not shown)")
    return 0

