"""Reading a run directory: its events, its summary (or one rebuilt from events), its restarts.

Everything a report shows comes from what the controller leaves in the run
directory (``summary.json``, ``events.jsonl``, ``plan.json``; names in
rundir.py), so a report can be made anywhere, long after the run, from a
copied directory, and from a run that died before it wrote its summary.
Damaged input (a torn last event line, an unreadable summary) degrades the
report; it never stops it.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from orchestrator import rundir
from orchestrator.records import fold

RUNNING_WINDOW_S = 120.0  # an unfinished run whose events changed this recently may still be going


class NotARunDir(ValueError):
    """The path has neither summary.json nor events.jsonl."""


@dataclass
class Restart:
    attempt: int
    cause: Optional[str] = None
    t: Optional[float] = None     # controller time of its first event
    step: Optional[int] = None    # first step it ran (the resume point + 1)


@dataclass
class RunData:
    path: Path
    summary: dict                 # summary.json, or one rebuilt from events ("incomplete")
    has_summary: bool
    summary_problem: Optional[str] = None  # summary.json is there but cannot be read (built from events instead)
    steps: dict[int, list[dict]] = field(default_factory=dict)    # rank -> step events, each with "attempt"
    memory: dict[int, list[dict]] = field(default_factory=dict)   # rank -> memory events, each with "attempt"
    restarts: list[Restart] = field(default_factory=list)
    t0: Optional[float] = None    # time of the first event; plots count seconds from here


def event_time(e: dict) -> Optional[float]:
    """The controller's receive time when present: one clock for every host, unlike each rank's ``t``."""
    t = e.get("recv_t", e.get("t"))
    return float(t) if isinstance(t, (int, float)) else None


def rank_of(e: dict) -> Optional[int]:
    r = e.get("from_rank", e.get("rank"))
    return r if isinstance(r, int) else None


def parse_lines(data: bytes) -> list[dict]:
    events = []
    for line in data.splitlines():
        try:
            e = json.loads(line)
        except (ValueError, RecursionError):  # a torn line from a killed controller, or garbage: skip it
            continue
        if isinstance(e, dict) and isinstance(e.get("kind"), str):
            events.append(e)
    return events


def read_events(path: Path, tail_bytes: Optional[int] = None) -> list[dict]:
    """The events in ``path`` (or only those in its last ``tail_bytes``); [] if it is missing."""
    if not path.is_file():  # missing, or a FIFO that would block
        return []
    try:
        with open(path, "rb") as f:
            if tail_bytes is None:
                return parse_lines(f.read())
            size = f.seek(0, 2)
            start = max(0, size - tail_bytes)
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    if start:
        data = data.split(b"\n", 1)[-1]  # the first line is probably cut
    return parse_lines(data)


def read_json(path: Path) -> Optional[dict]:
    """A JSON object from a regular file, else None (a FIFO by that name is never opened: it would block)."""
    try:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def tag_attempts(events: list[dict]) -> None:
    """Give every event an ``attempt``: its own field when the controller wrote one, else inferred.

    Inference: every attempt spawns every rank again, so the n-th ``spawned``
    event of a rank opens its attempt n-1. Old run directories (and events
    written before attempts existed) therefore still show their restarts.
    """
    spawned: dict[Optional[int], int] = defaultdict(int)
    for e in events:
        r = rank_of(e)
        if e["kind"] == "spawned":
            spawned[r] += 1
        if not isinstance(e.get("attempt"), int):
            e["attempt"] = max(spawned[r] - 1, 0)


def _restarts(events: list[dict], summary: dict) -> list[Restart]:
    causes = {a.get("attempt"): a.get("cause") for a in summary.get("attempts") or [] if isinstance(a, dict)}
    found: dict[int, Restart] = {}
    for e in events:
        a = e["attempt"]
        if a <= 0:
            continue
        r = found.setdefault(a, Restart(attempt=a, cause=causes.get(a)))
        t = event_time(e)
        if t is not None and (r.t is None or t < r.t):
            r.t = t
        if e["kind"] == "step" and isinstance(e.get("step"), int) and (r.step is None or e["step"] < r.step):
            r.step = e["step"]
    for a, cause in causes.items():  # attempts the summary knows of that left no events
        if isinstance(a, int) and a > 0 and a not in found:
            found[a] = Restart(attempt=a, cause=cause)
    return [found[a] for a in sorted(found)]


def summary_from_events(events: list[dict], plan: Optional[dict], status: str) -> dict:
    """A summary.json-shaped dict rebuilt from events, for runs that never wrote one.

    The ranks' rows come from the same fold the supervisor keeps while the run
    goes (records.RankRecord), so they mean what summary.json's rows mean.
    """
    hosts: dict[int, str] = {}
    if plan:
        for p in plan.get("ranks") or []:
            if isinstance(p, dict) and isinstance(p.get("rank"), int):
                hosts[p["rank"]] = str(p.get("host", "?"))
    records, run = fold(events, hosts)
    rows = []
    for r in sorted(records):
        rec = records[r]
        try:
            rows.append(rec.summary(exit_code=rec.exit_code, signal=rec.exit_signal).model_dump(mode="json"))
        except ValueError:  # a value an old or damaged event left that the summary cannot hold
            rows.append({"rank": r, "host": rec.host})
    times = [t for t in map(event_time, events) if t is not None]
    return {
        "status": status,
        "exit_code": None,
        "duration_s": round(max(times) - min(times), 3) if times else None,
        "started_at": iso(min(times)) if times else None,
        "world_size": (plan or {}).get("world_size") or (len(records) or None),
        "backend": (plan or {}).get("backend"),
        "ranks": rows,
        "metrics": run.metrics,
        "rebalances": [b.model_dump(mode="json") for b in run.rebalances],
    }


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def unfinished_status(events_path: Path) -> str:
    try:
        recent = time.time() - events_path.stat().st_mtime < RUNNING_WINDOW_S
    except OSError:
        recent = False
    return "running?" if recent else "incomplete"


def load_run(run_dir: str | Path) -> RunData:
    """Everything a report needs from one run directory. Raises ``NotARunDir``."""
    path = Path(run_dir)
    summary_path, events_path = path / rundir.SUMMARY, path / rundir.EVENTS
    if not path.is_dir() or not (summary_path.is_file() or events_path.is_file()):
        raise NotARunDir(f"{run_dir} is not a run directory (it has no summary.json or events.jsonl)")
    events = read_events(events_path)
    tag_attempts(events)
    summary = read_json(summary_path)
    has_summary = summary is not None
    if summary is None:
        summary = summary_from_events(events, read_json(path / rundir.PLAN), unfinished_status(events_path))
    problem = None if has_summary or not summary_path.exists() else \
        "summary.json cannot be read (not a JSON object): this report is built from events.jsonl"
    data = RunData(path=path, summary=summary, has_summary=has_summary, summary_problem=problem)
    for e in events:
        r = rank_of(e)
        if r is None:
            continue
        if e["kind"] == "step" and isinstance(e.get("step"), (int, float)):
            data.steps.setdefault(r, []).append(e)
        elif e["kind"] == "memory":
            data.memory.setdefault(r, []).append(e)
    data.restarts = _restarts(events, summary)
    times = [t for t in map(event_time, events) if t is not None]
    data.t0 = min(times) if times else None
    return data




def nums(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
