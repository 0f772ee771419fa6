"""A run's numbers for people: the derived figures, the per-rank, memory-plan and rebalance tables, the text summary.

Shared by ``orch report`` (text and HTML), ``orch runs`` and ``orch run --json``
(``derived``). Every function reads the summary dict (summary.json, or one
rebuilt from events by report/data.py) and tolerates missing or odd fields.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

from orchestrator.report.data import nums
from orchestrator.units import human_bytes

if TYPE_CHECKING:
    from orchestrator.report.data import RunData

NO_STEPS = "no training steps recorded"


def derived(summary: dict) -> dict:
    """The few numbers people ask of a run first, from its per-rank rows."""
    ranks = [r for r in summary.get("ranks") or [] if isinstance(r, dict)]
    mem = [r.get("memory") or {} for r in ranks]
    losses = nums(r.get("last_loss") for r in ranks)
    rates = nums(r.get("samples_per_s") for r in ranks)
    steps = nums(r.get("steps") for r in ranks)
    mlx = nums(m.get("mlx_peak_bytes") for m in mem)
    rss = nums(m.get("rss_peak_bytes") for m in mem)
    attempts = summary.get("attempts")
    diverged = nums(r.get("nonfinite_loss_step") for r in ranks)
    return {
        "final_loss": sum(losses) / len(losses) if losses else None,
        "diverged_at_step": int(min(diverged)) if diverged else None,  # the first step a loss was NaN/inf
        "steps": int(max(steps)) if steps else None,
        # every rank measures the job's global rate over its own step time; their mean is the job's
        "samples_per_s": sum(rates) / len(rates) if rates else None,
        "mlx_peak_bytes": int(max(mlx)) if mlx else None,
        "rss_peak_bytes": int(max(rss)) if rss else None,
        "restarts": max(len(attempts) - 1, 0) if isinstance(attempts, list) else 0,
    }


def num(x, fmt: str = "{:.4g}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def metric_value(name: str, x) -> str:
    """A reported metric for people: byte counts (``optimizer_state_bytes``, ``bytes_sent_per_step``) as
    sizes, everything else as a number (a rate such as ``bytes_per_s`` too: it is not a size)."""
    counts = name.endswith("_bytes") or "_bytes_per_step" in name or name.startswith("bytes_sent")
    if counts and isinstance(x, (int, float)) and not isinstance(x, bool):
        return human_bytes(x)
    return num(x)


def human_duration(s) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def loss_cell(loss, diverged_at) -> str:
    """A loss for people; one that was NaN or infinite (``null`` in the files) says so, and since when."""
    if diverged_at is not None and not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        return f"NaN/inf (step {diverged_at})"
    return num(loss)


def rank_cells(r: dict) -> list[str]:
    mem = r.get("memory") or {}
    ended = f"signal {r['signal']}" if r.get("signal") else num(r.get("exit_code"), "{}")
    return [str(r.get("rank", "?")), str(r.get("host", "?")), ended, num(r.get("steps"), "{}"),
            loss_cell(r.get("last_loss"), r.get("nonfinite_loss_step")), num(r.get("samples_per_s"), "{:,.1f}"),
            human_bytes(mem.get("mlx_peak_bytes")), human_bytes(mem.get("rss_peak_bytes"))]


RANK_HEADERS = ["rank", "host", "exit", "steps", "last loss", "samples/s", "mlx peak", "rss peak"]


PLAN_HEADERS = ["rank", "host", "budget", "batch", "micro x pieces", "predicted peak", "measured rss peak",
                "predicted mlx peak", "measured mlx peak"]


def plan_rows(s: dict) -> list[list[str]]:
    """Per rank: the memory plan made before the first step next to the peaks the run then measured."""
    rows = []
    for r in s.get("ranks") or []:
        p = r.get("memory_plan") if isinstance(r, dict) else None
        if not isinstance(p, dict):
            continue
        mem = r.get("memory") or {}
        budget = human_bytes(p.get("budget_bytes")) + (f" ({p['budget_source']})" if p.get("budget_source") else "")
        rows.append([str(r.get("rank", "?")), str(r.get("host", "?")), budget, num(p.get("batch"), "{}"),
                     f"{num(p.get('micro_batch'), '{}')} x {num(p.get('pieces'), '{}')}"
                     + ("" if p.get("fits", True) else " (refused)"),
                     human_bytes(p.get("predicted_peak_bytes")), human_bytes(mem.get("rss_peak_bytes")),
                     human_bytes(p.get("predicted_mlx_peak_bytes")), human_bytes(mem.get("mlx_peak_bytes"))])
    return rows


BALANCE_HEADERS = ["step", "why", "per-rank batch", "measured samples/s per rank", "predicted step (compute)"]


def rebalance_rows(s: dict) -> list[list[str]]:
    """``--balance speed``: one row per change of the per-rank batches (summary's ``rebalances``)."""
    rows = []
    for b in s.get("rebalances") or []:
        if not isinstance(b, dict):
            continue
        speeds = b.get("speeds") or []
        before, after = b.get("previous_step_s"), b.get("predicted_step_s")
        pred = f"{num(before, '{:.4g}')} s -> {num(after, '{:.4g}')} s" if after is not None else "-"
        rows.append([num(b.get("step"), "{}"), str(b.get("reason", "?")),
                     " : ".join(str(x) for x in b.get("shares") or []),
                     " : ".join(num(x, "{:,.0f}") for x in speeds) or "-", pred])
    return rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def overview(data: RunData) -> list[tuple[str, str]]:
    s, d = data.summary, derived(data.summary)
    rows = [
        ("status", str(s.get("status", "?"))),
        ("exit code", num(s.get("exit_code"), "{}")),
        ("failed rank", num(s.get("failed_rank"), "{}")),
        ("reason", str(s.get("reason") or "-")),
        ("started", str(s.get("started_at") or "-")),
        ("duration", human_duration(s.get("duration_s"))),
        ("script", str(s.get("script") or "-")),
        ("backend", str(s.get("backend") or "-")),
        ("ranks", num(s.get("world_size"), "{}")),
        ("steps", num(d["steps"], "{}")),
        ("final loss (mean)", loss_cell(d["final_loss"], d["diverged_at_step"])),
        ("restarts", str(max(d["restarts"], len(data.restarts)))),
    ]
    if not data.has_summary:
        rows.insert(1, ("note", data.summary_problem or
                        "no summary.json: the run is still going, or its controller was killed"))
    return rows


def format_summary(data: RunData) -> str:
    """The text `orch report` prints: overview, per-rank table, metrics."""
    lines = [f"{k:>18}: {v}" for k, v in overview(data)]
    ranks = [r for r in data.summary.get("ranks") or [] if isinstance(r, dict)]
    if ranks:
        lines += ["", text_table(RANK_HEADERS, [rank_cells(r) for r in ranks])]
    if not data.steps:
        lines += ["", NO_STEPS]
    plans = plan_rows(data.summary)
    if plans:
        lines += ["", "memory plan (predicted before the first step) vs measured:", text_table(PLAN_HEADERS, plans)]
    balance = rebalance_rows(data.summary)
    if balance:
        lines += ["", "batch shares (--balance speed):", text_table(BALANCE_HEADERS, balance)]
    metrics = data.summary.get("metrics") or {}
    if metrics:
        lines += ["", "metrics: " + ", ".join(f"{k} {metric_value(k, v)}" for k, v in metrics.items())]
    return "\n".join(lines)


