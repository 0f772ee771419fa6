"""The run directory: everything a run leaves behind, in one place.

::

    runs/<UTC timestamp>-<script stem>/
      summary.json        written when the run ends, whatever the outcome
      events.jsonl        every event from every rank, time-stamped, in arrival order
      logs/rank-<r>.log   each rank's complete output (stdout and stderr)
      logs/attempt-<n>/   the same for restart n (--max-restarts)
      mlx-hostfile.json   the MLX_HOSTFILE the ranks used (ring backend)
      plan.json           the plan: ranks, hosts, addresses
      checkpoints/        complete checkpoints only (written by the runtime; latest.json names the newest)
      report.html         orch report (report/: its PNGs)
      hosts/<host>/       files remote ranks wrote, brought home (remote runs)
      workdir/            files a remote rank wrote in its working directory, brought home
      .orch.lock          flock()ed by the run using the directory; holds its pid
      previous/<n>/       an earlier run's records (summary, events, plan, logs, report) when a new run,
                          not a --resume, is given the same --run-dir; checkpoints and brought-home files stay

Every one of those names is a constant here; no other module of the
controller spells one (the runtime keeps its own: it never imports this).

One run at a time per directory: two runs writing the same logs, events and
checkpoints would corrupt each other's resume point, so :meth:`RunDir.lock`
takes an exclusive ``flock`` on ``.orch.lock`` for the run's whole life (the
kernel drops it when the controller dies, however it dies: no stale locks).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import math
import os
import uuid
from pathlib import Path
from typing import IO, Literal, Optional

from pydantic import Field

from orchestrator.hostfile import ConfigError
from orchestrator.schema import Model

SUMMARY = "summary.json"
EVENTS = "events.jsonl"
PLAN = "plan.json"
MLX_HOSTFILE = "mlx-hostfile.json"  # = plan.FILE_NAMES["MLX_HOSTFILE"] (plan.py stays light; tests/test_records.py checks)
STAGING = "staging.json"
LOGS = "logs"
CHECKPOINTS = "checkpoints"  # = runtime.checkpoint.CHECKPOINTS_DIR (tests/test_records.py checks)
LATEST = "latest.json"  # the checkpoint manifest in CHECKPOINTS (= runtime.checkpoint.MANIFEST)
REPORT_HTML = "report.html"
REPORT_DIR = "report"
HOSTS = "hosts"
WORKDIR = "workdir"
LOCK_FILE = ".orch.lock"
PREVIOUS = "previous"


def rank_log_name(rank: int) -> str:
    return f"rank-{rank}.log"


def attempt_logs(attempt: int) -> str:
    """Where a restarted attempt's logs go, relative to the run directory (attempt 0: logs/ itself)."""
    return f"{LOGS}/attempt-{attempt}" if attempt else LOGS


def is_run_dir(path: Path) -> bool:
    """A directory a run wrote (or is writing): it has summary.json or events.jsonl."""
    return (path / SUMMARY).is_file() or (path / EVENTS).is_file()


class MemorySummary(Model):
    mlx_peak_bytes: int = 0
    mlx_active_bytes: int = 0
    mlx_cache_bytes: int = 0
    rss_peak_bytes: int = 0
    system_available_min_bytes: Optional[int] = None
    metal_max_recommended_working_set_size: Optional[int] = None


class PhaseSummary(Model):
    """One ``with report.phase(name):`` block of a rank: time, and memory before/after."""

    name: str
    duration_s: float
    ok: bool = True
    rss_before_bytes: Optional[int] = None
    rss_after_bytes: Optional[int] = None
    rss_peak_bytes: Optional[int] = None
    mlx_active_before_bytes: Optional[int] = None
    mlx_active_after_bytes: Optional[int] = None
    mlx_peak_bytes: Optional[int] = None


class RankSummary(Model):
    rank: int
    host: str
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    steps: Optional[int] = None
    last_loss: Optional[float] = None  # null in the file when it was NaN or infinite
    nonfinite_loss_step: Optional[int] = None  # the first step whose loss was NaN or infinite (the run diverged)
    samples_per_s: Optional[float] = None
    memory: Optional[MemorySummary] = None
    phases: list[PhaseSummary] = Field(default_factory=list)
    batch_share: Optional[int] = None  # --balance speed: this rank's samples per micro-batch at the end
    memory_plan: Optional[MemoryPlanSummary] = None  # predicted before the first step (runtime/memfit.py)


class MemoryPlanSummary(Model):
    """A rank's memory plan (``memory_plan`` event): its budget, and the peak predicted before the first step.

    The measured peaks are next to it in ``RankSummary.memory`` (``rss_peak_bytes``
    for ``predicted_peak_bytes``, ``mlx_peak_bytes`` for ``predicted_mlx_peak_bytes``).
    """

    budget_bytes: Optional[int] = None
    budget_source: Optional[str] = None
    batch: int
    micro_batch: int
    pieces: int = 1
    predicted_peak_bytes: int
    predicted_mlx_peak_bytes: int
    planned_peak_bytes: int
    fits: bool = True


class RebalanceSummary(Model):
    """One change of the per-rank batches under ``--balance speed`` (``rebalance`` events, rank 0's copy)."""

    step: int
    reason: str  # start | calibration | drift
    shares: list[int]
    previous: list[int] = Field(default_factory=list)
    speeds: list[float] = Field(default_factory=list)  # each rank's compute samples/s that decided it
    predicted_step_s: Optional[float] = None
    previous_step_s: Optional[float] = None


class AttemptSummary(Model):
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
    backend: Optional[str] = None  # the backend this attempt ran on (--fallback-backend may change it)
    diagnosis_cause: Optional[str] = None  # the diagnosis' key (e.g. "jaccl_queue_pair")


class RunSummary(Model):
    status: Literal["succeeded", "failed", "interrupted"]
    exit_code: int
    failed_rank: Optional[int] = None
    reason: Optional[str] = None
    diagnosis: Optional[str] = None
    diagnosis_cause: Optional[str] = None  # the diagnosis' machine-readable key (e.g. "jaccl_rdma_disabled")
    warnings: list[str] = Field(default_factory=list)  # e.g. a SIGKILLed JACCL rank may leave wired memory held
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
    rebalances: list[RebalanceSummary] = Field(default_factory=list)  # --balance speed


def default_run_dir(script: str, root: str | os.PathLike = "runs") -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")[:-4] + "Z"
    stem = Path(script).stem
    return Path(root) / f"{stamp}-{stem}"


def dumps(data, **kwargs) -> str:
    """JSON that every reader can parse: a NaN or infinity (a diverged loss) is written as ``null``.

    Python's ``json`` writes them as bare ``NaN``/``Infinity``, which JavaScript's ``JSON.parse``, ``jq``
    and most other readers refuse; one diverged step made a run's events.jsonl and summary.json unreadable
    to them. The summary says when a rank's loss stopped being finite (``nonfinite_loss_step``).
    """
    try:
        return json.dumps(data, allow_nan=False, **kwargs)
    except ValueError:  # rare: only then walk the data
        return json.dumps(_finite(data), allow_nan=False, **kwargs)


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_atomic(path: Path, text: str) -> None:
    """Readers (orch report, a resume, a person) see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        """Create the directory (and logs/); a path that cannot be one is a ``ConfigError`` line."""
        self.path = Path(path).resolve()
        self.logs = self.path / LOGS
        self.checkpoints = self.path / CHECKPOINTS
        self._lock_fd: Optional[int] = None
        self.run_id = uuid.uuid4().hex  # names this run's checkpoints (ORCH_RUN_ID), across restarts
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--run-dir {path}: is a file, not a directory; give a directory (it is created if missing)")
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "a part of the path is a file" if e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror
            raise ConfigError(f"--run-dir {path}: cannot create the run directory ({why}); "
                              "give a writable directory") from None
        self._events: Optional[IO[str]] = None
        self._logs: dict[int, IO[str]] = {}

    def set_aside_previous(self) -> Optional[Path]:
        """A new run in a directory an earlier run used: move that run's records to ``previous/<n>/``.

        Appending to its events.jsonl and logs mixed two runs (``orch report`` plotted both as one), and
        its summary.json was overwritten. The checkpoints stay (``orch run ... -- --resume`` continues
        from them), as do the files brought home from the hosts. Call with the lock held. Returns where
        the records went, or None when there were none.
        """
        if not is_run_dir(self.path):
            return None
        n = 1
        while (self.path / PREVIOUS / str(n)).exists():
            n += 1
        dest = self.path / PREVIOUS / str(n)
        dest.mkdir(parents=True)
        for name in (SUMMARY, EVENTS, PLAN, STAGING, REPORT_HTML, REPORT_DIR, LOGS):
            if (self.path / name).exists():
                os.replace(self.path / name, dest / name)
        self.logs.mkdir(exist_ok=True)
        return dest

    def lock(self) -> None:
        """Hold ``.orch.lock`` for this run's life; refuse (``ConfigError``) if another run holds it.

        ``flock`` locks belong to the open file, so the lock goes when this
        process exits, and ranks never inherit it (the fd is close-on-exec).
        """
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"--run-dir {self.path}: cannot write in the run directory ({e.strerror}); "
                              "give a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_pid(fd)
            os.close(fd)
            who = f"another orch run (pid {other})" if other else "another orch run"
            raise ConfigError(f"--run-dir {self.path}: {who} is using this run directory; "
                              "wait for it to finish or give another --run-dir") from None
        except OSError:  # a filesystem without flock (some network mounts): run unlocked rather than not at all
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)  # no stale pid for the next run to name
            except OSError:
                pass
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def start_attempt(self, attempt: int) -> None:
        """Logs of a restarted attempt go to logs/attempt-<n>/ so no attempt overwrites another."""
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        self.logs = self.path / attempt_logs(attempt)
        self.logs.mkdir(parents=True, exist_ok=True)

    def log(self, rank: int) -> IO[str]:
        f = self._logs.get(rank)
        if f is None:
            f = self._logs[rank] = open(self.rank_log(rank), "a", buffering=1)
        return f

    def rank_log(self, rank: int) -> Path:
        """This attempt's log of ``rank``."""
        return self.logs / rank_log_name(rank)

    @property
    def events_path(self) -> Path:
        return self.path / EVENTS

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoints / LATEST

    def event(self, payload: dict) -> None:
        if self._events is None:
            self._events = open(self.events_path, "a", buffering=1)
        self._events.write(dumps(payload, separators=(",", ":")) + "\n")

    def write_json(self, name: str, data) -> Path:
        p = self.path / name
        write_atomic(p, dumps(data, indent=2) + "\n")
        return p

    def write_summary(self, summary: RunSummary) -> Path:
        return self.write_json(SUMMARY, summary.model_dump(mode="json"))

    def close(self) -> None:
        """Close every file; a flush that fails now (disk full) was already reported as the run's failure."""
        for f in [*self._logs.values(), *([self._events] if self._events is not None else [])]:
            try:
                f.close()
            except OSError:
                pass
        self._logs.clear()
        self._events = None
        self.unlock()


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
