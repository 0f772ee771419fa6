"""The one contract between the controller and the rank runtime.

A rank talks to its controller with *event lines* on its own stdout::

    \\x1eORCH {"kind": "step", "rank": 0, "t": 1732240000.1, "step": 12, "loss": 0.25}\\n

* The line starts with ``MARKER`` (ASCII record separator + ``ORCH ``) so it can
  never be confused with user output, and the controller strips it from what
  the user sees and from ``logs/rank-<r>.log``.
* The payload is one JSON object on one line with at least ``kind``, ``rank``
  and ``t`` (UNIX time at the rank). The other fields per kind are the
  ``TypedDict`` s below.
* Stdout is the only channel that exists on every transport we use (a local
  pipe, an SSH channel, mpirun's forwarded output), so the same framing works
  everywhere. If user output without a trailing newline precedes an event, the
  controller splits the line at the marker.

The controller sends *control lines* the other way, on the rank guard's stdin
(see ``runtime/guard.py``): ``go`` opens the start gate of a rank that waits
for its ring neighbours to listen; ``release`` lets a rank held after it
started listening run on; ``stdin``/``stdin-eof`` carry the program's stdin
(``--stdin``); end of file means "stop now".

Why TypedDicts and not pydantic models here: this module is imported by every
rank at start-up, and defining pydantic models costs ~0.2 s of import time per
process. The controller validates these same shapes with pydantic's
``TypeAdapter`` (``orchestrator/events.py``), so there is still one definition.
They are ``typing.TypedDict`` s, not ``typing_extensions``' (which pydantic wants
before Python 3.12: ``events.py`` converts them): importing typing_extensions
costs every rank, and the CLI before it pre-starts local ranks, ~7 ms.
"""

from __future__ import annotations

import json
import time
from typing import Literal, Optional, TypedDict, Union

MARKER = "\x1eORCH "
PROTOCOL_VERSION = 1

# Control lines (controller -> guard stdin)
CONTROL_GO = "go"
CONTROL_RELEASE = "release"
# The first control line a guard started with ``--token-line`` reads, before it
# starts its rank: ``token <hex>``. (A ``--deferred`` guard finds the token in
# its configuration line instead, under the key ``"token"``.)
CONTROL_TOKEN = "token"
# ``dump``: the guard sends its rank DUMP_SIGNAL, on which the bootstrap has
# registered ``faulthandler``: every thread's Python stack goes to the rank's
# stderr (so into its log), and the hang diagnosis quotes the top frames.
# SIGURG because its default action is to do nothing: a program the bootstrap
# exec'd (not Python) is not harmed by it. The guard answers with a ``dump``
# event saying whether it signalled the rank or found it stopped.
CONTROL_DUMP = "dump"
DUMP_SIGNAL_NAME = "SIGURG"
# ``--stdin rank0|all``: the program's stdin travels on the same control channel,
# framed so it can never be read as a control word: ``stdin <base64>`` carries
# bytes the guard writes to a pipe that is the rank's stdin, ``stdin-eof``
# closes that pipe (the rank reads end of file). End of file on the channel
# itself still means "stop now". ``ENV_STDIN=pipe`` (set by the controller on
# the chosen ranks, removed by the guard) asks the guard for that pipe; any
# other rank's stdin is /dev/null. A chunk is at most STDIN_CHUNK bytes before
# encoding, so a control line stays under 64 KiB.
CONTROL_STDIN = "stdin"
CONTROL_STDIN_EOF = "stdin-eof"
ENV_STDIN = "ORCH_STDIN"
STDIN_CHUNK = 48 * 1024
# Flow control, so a rank that reads slowly (or never) holds orch's input back instead of
# piling it up in memory: the guard reports the bytes it has fed its rank so far in a
# ``stdin_read`` event every STDIN_ACK_EVERY bytes; the controller keeps at most
# STDIN_WINDOW bytes unreported per rank (far more than one step, so it only waits
# for a rank that really does not read).
STDIN_WINDOW = 4 << 20
STDIN_ACK_EVERY = 256 << 10

# Events only the guard may send. They carry the attempt's token (``"token"``),
# which the guard got on its stdin, a pipe the rank never sees: the controller
# takes a pid to signal only from a ``spawned`` event with the right token, so
# nothing a rank prints can make orch signal another process. Guards started
# without a stdin (``--no-stdin``, under mpirun) send these without a token;
# the controller then never uses their pids.
# ``rss`` and ``dump`` are here too: a rank that printed a fake sample could hide
# its own hang (CPU "progress") or be called stopped when it is not.
GUARD_KINDS = frozenset({"spawned", "listening", "exited", "rss", "dump", "stdin_read"})
TOKEN_FIELD = "token"

# A rank's memory budget in bytes, set from the hostfile's per-host ``memory_gb`` (divided
# among the host's ranks); read by ``runtime/memfit.py`` before it looks anywhere else.
MEMORY_BUDGET_ENV = "ORCH_MEMORY_BUDGET_BYTES"

# ---- environment variables: every ``ORCH_*`` name, in one place ----------------------------
# Set by the controller on every rank (``job.build_specs``), read by the guard and the runtime.
ENV_EVENTS = "ORCH_EVENTS"  # "1": emit event lines (outside orch nothing is emitted)
ENV_RUN_DIR = "ORCH_RUN_DIR"  # where the rank writes checkpoints and stats (remote: its host's copy)
ENV_RUN_ID = "ORCH_RUN_ID"  # the same for every attempt of one run (checkpoint pruning)
ENV_BACKEND = "ORCH_BACKEND"  # the backend the plan chose (mx.distributed.init's)
ENV_WORLD_SIZE = "ORCH_WORLD_SIZE"
ENV_GRACE_S = "ORCH_GRACE_S"  # guard: seconds between SIGTERM and SIGKILL
ENV_GUARD_RSS = "ORCH_GUARD_RSS"  # guard: "1": send "rss" events (the controller must know the kind)
ENV_BIND = "ORCH_BIND"  # guard: "i/n": pin the rank to the i-th of n blocks of cores (--bind)
ENV_HOST = "ORCH_HOST"  # the host's name in the hostfile: which ranks share a machine (quiet_wait.py)
ENV_MLX_HOSTFILE_JSON = "ORCH_MLX_HOSTFILE_JSON"  # SSH: MLX_HOSTFILE's content; the bootstrap writes the file
ENV_PRESPAWN = "ORCH_PRESPAWN"  # "0": do not pre-start local ranks (launch/prespawn.py)
ENV_MLX_LM_RESUME = "ORCH_MLX_LM_RESUME"  # "0": leave mlx-lm's trainer unwrapped (integrations/mlx_lm_resume.py)
ENV_BALANCE_TEST_SPEEDS = "ORCH_BALANCE_TEST_SPEEDS"  # test hook of runtime/balance.py
ENV_SUM_SCATTER = "ORCH_SUM_SCATTER"  # "off": keep MLX's sum_scatter where the backend lacks one (runtime/collectives.py)
# The ring start (orchestrator/ringstart.py, runtime/ringstart.py): set by the controller.
ENV_LISTEN = "ORCH_LISTEN"  # "ip:port" the rank's ring socket binds: the guard watches for it
ENV_GATED = "ORCH_GATED"  # "1": the rank waits at its start gate for CONTROL_GO
ENV_HOLD = "ORCH_HOLD"  # "1": the guard SIGSTOPs the rank once it listens, until CONTROL_RELEASE
ENV_HOLD_MAX_S = "ORCH_HOLD_MAX_S"  # the bound of a hold (default HOLD_MAX_S); also a test knob
ENV_GATE_TIMEOUT = "ORCH_GATE_TIMEOUT"  # the bound of the gate in the rank (default GATE_TIMEOUT_S)
# Set by the guard for its rank (file descriptors of pipes it passes down).
ENV_INIT_FD = "ORCH_INIT_FD"  # rank -> guard: INIT_BYTE right before mx.distributed.init
ENV_GATE_FD = "ORCH_GATE_FD"  # guard -> rank: GATE_LINE when the gate opens
ENV_CONFIG_FD = "ORCH_CONFIG_FD"  # guard -> deferred rank: its configuration line

HOLD_MAX_S = 10.0
GATE_TIMEOUT_S = 10.0

# ---- the four "wait for one line" handshakes ----------------------------------------------
# Each side blocks (bounded) for exactly one thing from the other before it goes on:
# 1. token: a guard started with ``--token-line`` reads ``CONTROL_TOKEN <hex>`` from its stdin
#    before it starts the rank (TOKEN_WAIT_S);
# 2. configuration: a ``--deferred`` guard (and through it its pre-started rank, on
#    ENV_CONFIG_FD) reads one JSON line ``{"env", "argv", "cwd", "token"}`` (CONFIG_WAIT_S);
# 3. init: the guard waits for INIT_BYTE on ENV_INIT_FD (end of file: the rank will never
#    init) before it looks for the rank's listening socket;
# 4. gate: a gated rank waits in ``mx.distributed.init`` for GATE_LINE on ENV_GATE_FD
#    (GATE_TIMEOUT_S, or ENV_GATE_TIMEOUT).
TOKEN_WAIT_S = 30.0
CONFIG_WAIT_S = 600.0
INIT_BYTE = b"i"
GATE_LINE = b"go\n"

# An event payload longer than this is not parsed at all (it is kept as user
# text): a hostile or broken rank cannot make the controller parse megabytes
# of JSON or recurse through deeply nested arrays.
MAX_EVENT_BYTES = 64 * 1024


class _Base(TypedDict):
    rank: int
    t: float


class SpawnedEvent(_Base):
    """The guard started the rank process (its pid is the trainer's pid)."""

    kind: Literal["spawned"]
    pid: int
    host: str


class _ExitedFields(_Base):
    kind: Literal["exited"]
    code: Optional[int]
    signal: Optional[int]


class ExitedEvent(_ExitedFields, total=False):
    """The guard's last word: how the rank ended (for launchers that cannot see it, like mpirun).

    ``max_rss_bytes``: the rank process's peak resident memory as the kernel counted it (the rusage of
    the reaped process). The guard's 2 s samples miss the peak of a short program, or see a process
    mid-exec (16 KiB); this one does not.
    """

    max_rss_bytes: int


class InitStartEvent(_Base):
    """The rank called ``mx.distributed.init``."""

    kind: Literal["init_start"]
    backend: str


class ListeningEvent(_Base):
    """The rank's ring socket is bound and listening (used to open start gates)."""

    kind: Literal["listening"]
    address: str


class ReadyEvent(_Base):
    """``mx.distributed.init`` returned: the rank is part of the group."""

    kind: Literal["ready"]
    size: int
    init_s: float


class TrainStartEvent(_Base):
    """A runtime trainer begins its loop (arms the controller's hang watchdog)."""

    kind: Literal["train_start"]
    step: int
    total_steps: Optional[int]


class StepEvent(_Base):
    kind: Literal["step"]
    step: int
    epoch: int
    loss: float
    samples_per_s: float
    tokens_per_s: Optional[float]
    step_time_s: float
    total_steps: Optional[int]


class MemoryEvent(_Base):
    kind: Literal["memory"]
    step: int
    mlx_active_bytes: int
    mlx_peak_bytes: int
    mlx_cache_bytes: int
    rss_bytes: int
    system_available_bytes: int
    metal_memory_size: Optional[int]
    metal_max_recommended_working_set_size: Optional[int]


class CheckpointEvent(_Base):
    kind: Literal["checkpoint"]
    step: int
    path: str


class MetricEvent(_Base):
    """Free-form scalar metrics a recipe reports (accuracy, perplexity...)."""

    kind: Literal["metric"]
    step: int
    values: dict


class FinishedEvent(_Base):
    kind: Literal["finished"]
    step: int


class PhaseStartEvent(_Base):
    """A named phase of a program began: evaluation, a checkpoint save, mlx-lm's validation, ``report.phase(...)``.

    Between this and its ``phase`` event the rank is busy on purpose, not stepping: the
    controller's step-cadence watchdog does not count that time (``--hang-timeout`` still does).
    """

    kind: Literal["phase_start"]
    name: str


class PhaseEvent(_Base):
    """A named phase of a program ended (``with report.phase("load model"):``).

    ``t`` is when it ended. Memory before/after: RSS always where the platform
    tells it (``/proc`` on Linux, psutil elsewhere); MLX active/peak only if the
    program had already imported MLX (the reporter never imports it itself).
    """

    kind: Literal["phase"]
    name: str
    duration_s: float
    ok: bool
    rss_before_bytes: Optional[int]
    rss_after_bytes: Optional[int]
    rss_peak_bytes: Optional[int]
    mlx_active_before_bytes: Optional[int]
    mlx_active_after_bytes: Optional[int]
    mlx_peak_bytes: Optional[int]


class RssEvent(_Base):
    """The guard's sample of its rank's memory and CPU (any program): ``ORCH_GUARD_RSS=1``, every ~2 s.

    ``tree_rss_bytes`` adds the rank's descendants (data loaders, a shell's child);
    ``system_available_bytes`` is None where the platform gives no reading the
    guard can parse with the standard library. ``cpu_s``: CPU seconds (user +
    system) the rank's process tree has used so far (on Linux with its exited,
    waited-for children); the controller's idle-hang watchdog reads whether it
    still advances. ``stopped``: the rank's process is stopped (SIGSTOP,
    SIGTSTP, a tracer), so it runs nothing and cannot dump its stack.
    """

    kind: Literal["rss"]
    rss_bytes: int
    tree_rss_bytes: Optional[int]
    system_available_bytes: Optional[int]
    cpu_s: Optional[float]
    stopped: Optional[bool]


class DumpEvent(_Base):
    """The guard's answer to a ``dump`` control line.

    ``signalled``: the dump signal was sent (the stacks follow on the rank's
    stderr). ``stopped``: the rank's process is stopped, so no stack will come;
    the guard does not signal it then (the dump would otherwise pop out
    whenever it is resumed, long after the diagnosis).
    """

    kind: Literal["dump"]
    signalled: bool
    stopped: bool


class StdinReadEvent(_Base):
    """``--stdin`` flow control from the guard: ``bytes`` fed to the rank's stdin so far.

    ``closed``: the rank's stdin is closed (it closed it, or it ended), so
    nothing more is fed and the controller stops waiting for this rank.
    """

    kind: Literal["stdin_read"]
    bytes: int
    closed: bool


class RebalanceEvent(_Base):
    """``--balance speed`` set the per-rank batches at a step boundary (``runtime/balance.py``).

    Every rank sends the same one; ``shares[r]`` is rank r's samples per
    micro-batch (they sum to the unchanged global micro-batch), ``speeds`` each
    rank's measured compute samples/s. ``reason``: ``start`` (the shares a run
    begins with), ``calibration`` (the first measured split) or ``drift``.
    """

    kind: Literal["rebalance"]
    step: int
    shares: list[int]
    previous: list[int]
    speeds: list[float]
    reason: str
    predicted_step_s: Optional[float]
    previous_step_s: Optional[float]


class MemoryPlanEvent(_Base):
    """A rank's memory plan before its first step (``runtime/memfit.py``).

    ``probes``: ``[batch, MLX peak bytes]`` of the two probe steps; ``budget_*``:
    what the rank may use and where that was read (None: unknown);
    ``planned_peak_bytes`` the predicted process peak at its planned ``batch``,
    ``predicted_peak_bytes`` at ``micro_batch`` (``pieces`` of them per
    micro-batch with ``--fit-memory``); ``fits`` False means it refused.
    """

    kind: Literal["memory_plan"]
    step: int
    probes: list[list[int]]
    host: str
    budget_bytes: Optional[int]
    budget_source: Optional[str]
    batch: int
    micro_batch: int
    pieces: int
    predicted_peak_bytes: int
    predicted_mlx_peak_bytes: int
    planned_peak_bytes: int
    fits: bool
    per_sample_bytes: float


Event = Union[
    StdinReadEvent,
    RebalanceEvent,
    MemoryPlanEvent,
    RssEvent,
    DumpEvent,
    SpawnedEvent,
    ExitedEvent,
    InitStartEvent,
    ListeningEvent,
    ReadyEvent,
    TrainStartEvent,
    StepEvent,
    MemoryEvent,
    CheckpointEvent,
    MetricEvent,
    FinishedEvent,
    PhaseStartEvent,
    PhaseEvent,
]


def encode(kind: str, rank: int, **fields) -> str:
    """One event as a complete line (with the newline), ready to write."""
    payload = {"kind": kind, "rank": rank, "t": time.time(), **fields}
    return MARKER + json.dumps(payload, separators=(",", ":")) + "\n"


def split_line(line: str) -> tuple[str | None, dict | None]:
    """Split one output line into (user text, event payload).

    Either part may be None. A malformed payload is returned as user text so
    nothing a rank printed is ever silently dropped. The *last* marker counts:
    an event always ends its line (``encode`` writes it whole, newline
    included), so one the guard writes while its rank is in the middle of a
    line, even a line that itself starts with a marker, is still found.
    """
    idx = line.rfind(MARKER)
    if idx < 0:
        return line, None
    text = line[:idx] or None
    raw = line[idx + len(MARKER):].strip()
    if len(raw) > MAX_EVENT_BYTES:
        return line, None
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):  # also 5000-digit integers (ValueError)
        return line, None
    if not isinstance(payload, dict) or not isinstance(payload.get("kind"), str):
        return line, None
    return text, payload
