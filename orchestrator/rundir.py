"""The run directory: everything a run leaves behind, in one place.

::

    runs/<UTC timestamp>-<script stem>/
      summary.json        written when the run ends, whatever the outcome
      events.jsonl        every event from every rank, time-stamped, in arrival order
      logs/rank-<r>.log   each rank's complete output (stdout and stderr)
      logs/attempt-<n>/   the same for restart n (--max-restarts)
      mlx-hostfile.json   the MLX_HOSTFILE the ranks used (ring backend)
      checkpoints/        complete checkpoints only (written by the runtime)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import IO, Literal, Optional

from pydantic import BaseModel, Field


class MemorySummary(BaseModel):
    mlx_peak_bytes: int = 0
    mlx_active_bytes: int = 0
    mlx_cache_bytes: int = 0
    rss_peak_bytes: int = 0
    system_available_min_bytes: Optional[int] = None
    metal_max_recommended_working_set_size: Optional[int] = None


class RankSummary(BaseModel):
    rank: int
    host: str
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    steps: Optional[int] = None
    last_loss: Optional[float] = None
    samples_per_s: Optional[float] = None
    memory: Optional[MemorySummary] = None


class AttemptSummary(BaseModel):
    attempt: int
    cause: Optional[str] = None  # why this attempt was started (the previous one's failure)
    status: str
    exit_code: int
    failed_rank: Optional[int] = None
    reason: Optional[str] = None
    diagnosis: Optional[str] = None
    started_at: str
    duration_s: float
    resumed: bool = False
    note: Optional[str] = None  # what orch changed after this attempt (e.g. a host excluded)


class RunSummary(BaseModel):
    status: Literal["succeeded", "failed", "interrupted"]
    exit_code: int
    failed_rank: Optional[int] = None
    reason: Optional[str] = None
    diagnosis: Optional[str] = None
    duration_s: float
    started_at: str
    script: str
    backend: str
    world_size: int
    run_dir: str
    ranks: list[RankSummary] = Field(default_factory=list)
    metrics: dict = Field(default_factory=dict)
    restarts: int = 0
    attempts: list[AttemptSummary] = Field(default_factory=list)


def default_run_dir(script: str, root: str | os.PathLike = "runs") -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")[:-4] + "Z"
    stem = Path(script).stem
    return Path(root) / f"{stamp}-{stem}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.logs = self.path / "logs"
        self.checkpoints = self.path / "checkpoints"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._events: Optional[IO[str]] = None
        self._logs: dict[int, IO[str]] = {}

    def start_attempt(self, attempt: int) -> None:
        """Logs of a restarted attempt go to logs/attempt-<n>/ so no attempt overwrites another."""
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        self.logs = self.path / "logs" / f"attempt-{attempt}"
        self.logs.mkdir(parents=True, exist_ok=True)

    def log(self, rank: int) -> IO[str]:
        f = self._logs.get(rank)
        if f is None:
            f = self._logs[rank] = open(self.logs / f"rank-{rank}.log", "a", buffering=1)
        return f

    def event(self, payload: dict) -> None:
        if self._events is None:
            self._events = open(self.path / "events.jsonl", "a", buffering=1)
        self._events.write(json.dumps(payload, separators=(",", ":")) + "\n")

    def write_json(self, name: str, data) -> Path:
        p = self.path / name
        write_atomic(p, json.dumps(data, indent=2) + "\n")
        return p

    def write_summary(self, summary: RunSummary) -> Path:
        return self.write_json("summary.json", summary.model_dump(mode="json"))

    def close(self) -> None:
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        if self._events is not None:
            self._events.close()
            self._events = None
