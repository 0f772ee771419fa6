"""Memory-fit planning: know before the first step whether a rank's batch fits its machine.

A 16 GB Mac next to a 192 GB one dies on the first step of a batch sized for
the big one (MLX #1804), usually after minutes of loading. Before the first
real step every rank

* reads its **budget** (:func:`budget`): ``ORCH_MEMORY_BUDGET_BYTES`` (the
  hostfile's ``memory_gb`` for that host, divided among its ranks), else on
  macOS Metal's recommended working set, else on Linux the memory cgroup's limit
  (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; the tightest of the rank's
  cgroup and its ancestors) less what the rest of that cgroup uses now, else ``MemAvailable`` shared among the host's ranks;
* **predicts its peak** at its planned micro-batch from two small probe steps
  (forward + backward at about 1/8 and 1/4 of it, no update; the data order and
  the per-step seeds are untouched): MLX's peak grows linearly with the batch
  (activations), so a line through the two points, plus the transient of the
  update and the all-reduce (new parameters and optimizer state while the old
  are alive, a flat copy of the gradients) gives the peak;
* then either goes on, or **refuses** with one line naming the host, the
  predicted peak and the budget, or with ``--fit-memory`` **shrinks** its
  micro-batch to the largest that fits and raises its own gradient
  accumulation: the rank's samples are split into ``pieces`` and their mean
  gradients combined weighted by piece size, which is exactly the mean over
  its share. The global batch and hence the update do not change (up to float
  rounding), and each rank decides for itself: a small Mac accumulates more,
  a big one does not.

On Linux (CPU) MLX's buffers live in the process, so the process peak is the
non-MLX part of the resident set (interpreter, libraries, the dataset) plus
MLX's peak; on macOS unified memory, Metal's working set is compared with
MLX's peak alone. This module is stdlib-only; the trainer runs the probes.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from orchestrator import protocol
from orchestrator.protocol import MEMORY_BUDGET_ENV as BUDGET_ENV  # noqa: E402 (set from the hostfile)
HOST_ENV = protocol.ENV_HOST
MARGIN = 0.9  # plan to at most this fraction of the budget: allocator slack, fragmentation
_UNLIMITED = 1 << 60


@dataclass
class Budget:
    bytes: int
    source: str  # what it was read from, for the one-line refusal


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def cgroup_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[tuple[int, int]]:
    """``(limit, usage)`` of the tightest memory limit over this process's cgroup and its ancestors, v2 or v1;
    None without a finite limit.

    A parent's limit binds every cgroup below it, and a rank seldom sits where the limit was set: sshd
    starts sessions in child cgroups (systemd's ``session-N.scope`` under a ``user-UID.slice`` with
    ``MemoryMax``), so the rank's own ``memory.max`` says ``max``. Of the levels with a limit, the one with
    the least room (limit less usage) is the one that will kill. On a hybrid host (v1 controllers under
    ``root/memory``, an empty cgroup2 at ``root/unified``) the v2 line finds no ``memory.max`` and the
    v1 ``memory`` line decides.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2 unified
            base, limit_file, usage_file = Path(root), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = Path(root) / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        tightest: Optional[tuple[int, int]] = None
        level = Path(rel.lstrip("/"))
        for d in [level, *level.parents]:  # this cgroup, then each parent up to the hierarchy's root
            limit = _read_int(base / d / limit_file)
            if limit is None:
                continue
            usage = _read_int(base / d / usage_file) or 0
            if tightest is None or limit - usage < tightest[0] - tightest[1]:
                tightest = (limit, usage)
        if tightest is not None:
            return tightest
    return None


def mem_available(meminfo: str = "/proc/meminfo") -> Optional[int]:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def budget(rss_now: int, metal_working_set: Optional[int] = None, local_ranks: int = 1,
           env: Optional[dict] = None, cgroup: Callable[[], Optional[tuple[int, int]]] = cgroup_memory,
           available: Callable[[], Optional[int]] = mem_available) -> Optional[Budget]:
    """This rank's memory budget in bytes (what its whole process may reach), and where it came from."""
    env = os.environ if env is None else env
    local_ranks = max(1, local_ranks)
    given = env.get(BUDGET_ENV, "")
    if given.isdigit() and int(given) > 0:
        return Budget(int(given), "hostfile memory_gb")
    if metal_working_set:
        return Budget(metal_working_set // local_ranks, "Metal recommended working set")
    cg = cgroup()
    if cg is not None:
        limit, usage = cg
        others = max(0, usage - rss_now)  # the rest of the cgroup (other ranks, page cache) as it is now
        return Budget(max(0, limit - others), "cgroup memory limit")
    avail = available()
    if avail is not None:
        return Budget(rss_now + avail // local_ranks, "available memory")
    return None


@dataclass
class Line:
    """MLX peak bytes = ``base + per_sample * batch`` (fitted from the probes) + ``extra`` (update, all-reduce)."""

    base: float
    per_sample: float
    extra: int
    other_bytes: int  # the process's resident memory that is not MLX's (0 on Metal: compared with MLX alone)

    def mlx_peak(self, batch: int) -> int:
        return int(self.base + self.per_sample * batch + self.extra)

    def process_peak(self, batch: int) -> int:
        return self.other_bytes + self.mlx_peak(batch)

    def largest_batch(self, limit: int) -> int:
        """The largest micro-batch whose predicted process peak is at most ``limit`` (0: not even one)."""
        room = limit - self.other_bytes - self.base - self.extra
        if room < self.per_sample:
            return 0
        if self.per_sample <= 0:
            return sys.maxsize
        return int(room // self.per_sample)


def fit(points: list[tuple[int, int]], extra: int, other_bytes: int) -> Line:
    """A line through probe points ``(batch, mlx peak bytes)``; the slope is never negative."""
    (b1, p1), (b2, p2) = points[0], points[-1]
    slope = max(0.0, (p2 - p1) / (b2 - b1)) if b2 != b1 else 0.0
    return Line(base=p1 - slope * b1, per_sample=slope, extra=extra, other_bytes=other_bytes)


def probe_sizes(micro: int) -> tuple[int, int]:
    """Two batch sizes well below the planned ``micro`` (so probing can not be what runs out of memory)."""
    b2 = max(1, micro // 4)
    b1 = max(1, b2 // 2)
    return b1, b2


def split_pieces(n: int, pieces: int) -> list[tuple[int, int]]:
    """``[start, end)`` bounds of ``pieces`` near-equal contiguous parts of ``n`` samples (sizes differ by <= 1)."""
    pieces = max(1, min(pieces, n))
    q, r = divmod(n, pieces)
    bounds, start = [], 0
    for i in range(pieces):
        end = start + q + (1 if i < r else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass
class Plan:
    """What one rank decided; goes into the ``memory_plan`` event and summary.json."""

    host: str
    budget_bytes: Optional[int]
    budget_source: Optional[str]
    batch: int  # this rank's planned samples per micro-batch (its share)
    micro_batch: int  # what it actually runs at once (batch unless --fit-memory shrank it)
    pieces: int  # micro-batches its share is split into (1: as planned)
    predicted_peak_bytes: int  # the process at micro_batch
    predicted_mlx_peak_bytes: int
    planned_peak_bytes: int  # the process at the planned batch (what would have run)
    fits: bool
    per_sample_bytes: float
    shrink: bool = False  # --fit-memory was asked for (not in the event: it is the run's flag)

    def event_fields(self) -> dict:
        d = asdict(self)
        d.pop("shrink")
        d["per_sample_bytes"] = round(self.per_sample_bytes, 1)
        return d

    def refusal(self, rank: int) -> str:
        head = (f"memory: rank {rank} on {self.host}: predicted peak {_gib(self.planned_peak_bytes)} at batch {self.batch} "
                f"> budget {_gib(self.budget_bytes)} ({self.budget_source}); ")
        if self.shrink:
            return head + ("even one sample per micro-batch does not fit (the model, its gradients and optimizer "
                           "state alone are too big there): give the host more memory or use a smaller model")
        return head + "lower --batch-size, give the host more memory, or add --fit-memory to accumulate smaller " \
                      "micro-batches there"


def _gib(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def decide(line: Line, batch: int, bud: Optional[Budget], host: str, shrink: bool) -> Plan:
    """Fits as planned, or (``shrink``) the fewest pieces whose micro-batch fits, or a refusal."""
    planned = line.process_peak(batch)
    if bud is None:
        return Plan(host, None, None, batch, batch, 1, planned, line.mlx_peak(batch), planned, True, line.per_sample)
    limit = int(bud.bytes * MARGIN)
    if planned <= limit:
        micro, pieces, fits = batch, 1, True
    elif shrink and line.largest_batch(limit) >= 1:
        pieces = math.ceil(batch / line.largest_batch(limit))
        micro = math.ceil(batch / pieces)
        fits = True
    else:
        micro, pieces, fits = batch, 1, False
    return Plan(host, bud.bytes, bud.source, batch, micro, pieces, line.process_peak(micro), line.mlx_peak(micro),
                planned, fits, line.per_sample, shrink)
