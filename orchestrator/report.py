"""Run reports: what a run directory says, for people (HTML, PNG, text) and machines (JSON).

Everything here reads only what the controller leaves in the run directory
(``summary.json``, ``events.jsonl``, ``plan.json``), so a report can be made
anywhere, long after the run, from a copied directory, and from a run that
died before it wrote its summary. Damaged input (a torn last event line, an
unreadable summary) degrades the report; it never stops it.

matplotlib is the optional extra ``report`` and is imported only inside
``write_report``: the controller starts on laptops without it and must start
fast. Plots use ``matplotlib.figure.Figure`` directly (the Agg canvas), never
pyplot, so no GUI backend or global figure state is ever touched.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from orchestrator.units import human_bytes

if TYPE_CHECKING:
    from orchestrator.rundir import RunSummary

REPORT_HTML = "report.html"
REPORT_DIR = "report"
PLOT_NAMES = ("loss.png", "throughput.png", "memory.png")
NO_STEPS = "no training steps recorded"
INSTALL_HINT = 'pip install "mlx-orch[report]"'
TAIL_BYTES = 256 * 1024  # how much of events.jsonl `orch runs` reads for a run without a summary
RUNNING_WINDOW_S = 120.0  # an unfinished run whose events changed this recently may still be going


class NotARunDir(ValueError):
    """The path has neither summary.json nor events.jsonl."""


class ReportError(RuntimeError):
    """The report cannot be made here (matplotlib missing)."""


# ----------------------------------------------------------------------------- reading a run


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
    steps: dict[int, list[dict]] = field(default_factory=dict)    # rank -> step events, each with "attempt"
    memory: dict[int, list[dict]] = field(default_factory=dict)   # rank -> memory events, each with "attempt"
    restarts: list[Restart] = field(default_factory=list)
    t0: Optional[float] = None    # time of the first event; plots count seconds from here


def _t(e: dict) -> Optional[float]:
    """The controller's receive time when present: one clock for every host, unlike each rank's ``t``."""
    t = e.get("recv_t", e.get("t"))
    return float(t) if isinstance(t, (int, float)) else None


def _rank_of(e: dict) -> Optional[int]:
    r = e.get("from_rank", e.get("rank"))
    return r if isinstance(r, int) else None


def _parse_lines(data: bytes) -> list[dict]:
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
                return _parse_lines(f.read())
            size = f.seek(0, 2)
            start = max(0, size - tail_bytes)
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    if start:
        data = data.split(b"\n", 1)[-1]  # the first line is probably cut
    return _parse_lines(data)


def _read_json(path: Path) -> Optional[dict]:
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
        r = _rank_of(e)
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
        t = _t(e)
        if t is not None and (r.t is None or t < r.t):
            r.t = t
        if e["kind"] == "step" and isinstance(e.get("step"), int) and (r.step is None or e["step"] < r.step):
            r.step = e["step"]
    for a, cause in causes.items():  # attempts the summary knows of that left no events
        if isinstance(a, int) and a > 0 and a not in found:
            found[a] = Restart(attempt=a, cause=cause)
    return [found[a] for a in sorted(found)]


def summary_from_events(events: list[dict], plan: Optional[dict], status: str) -> dict:
    """A summary.json-shaped dict rebuilt from events, for runs that never wrote one."""
    ranks: dict[int, dict] = {}
    if plan:
        for p in plan.get("ranks") or []:
            if isinstance(p, dict) and isinstance(p.get("rank"), int):
                ranks[p["rank"]] = {"rank": p["rank"], "host": p.get("host", "?")}
    for e in events:
        r = _rank_of(e)
        if r is None:
            continue
        row = ranks.setdefault(r, {"rank": r, "host": "?"})
        k = e["kind"]
        if k == "spawned":
            row["pid"] = e.get("pid")
        elif k == "exited":
            row["exit_code"], row["signal"] = e.get("code"), e.get("signal")
        elif k == "step":
            row.update(steps=e.get("step"), last_loss=e.get("loss"), samples_per_s=e.get("samples_per_s"))
        elif k == "memory":
            m = row.setdefault("memory", {"mlx_peak_bytes": 0, "rss_peak_bytes": 0})
            m["mlx_peak_bytes"] = max(m["mlx_peak_bytes"], e.get("mlx_peak_bytes") or 0)
            m["rss_peak_bytes"] = max(m["rss_peak_bytes"], e.get("rss_bytes") or 0)
            m["mlx_active_bytes"] = e.get("mlx_active_bytes")
        elif k == "memory_plan":
            row["memory_plan"] = {f: e.get(f) for f in PLAN_FIELDS}
        elif k == "rebalance" and isinstance(e.get("shares"), list) and r < len(e["shares"]):
            row["batch_share"] = e["shares"][r]
    times = [t for t in map(_t, events) if t is not None]
    metrics: dict = {}
    for e in events:
        if e["kind"] == "metric" and isinstance(e.get("values"), dict):
            metrics.update(e["values"])
    return {
        "status": status,
        "exit_code": None,
        "duration_s": round(max(times) - min(times), 3) if times else None,
        "started_at": _iso(min(times)) if times else None,
        "world_size": (plan or {}).get("world_size") or (len(ranks) or None),
        "backend": (plan or {}).get("backend"),
        "ranks": [ranks[r] for r in sorted(ranks)],
        "metrics": metrics,
        "rebalances": [e for e in events if e["kind"] == "rebalance" and _rank_of(e) == 0],
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _unfinished_status(events_path: Path) -> str:
    try:
        recent = time.time() - events_path.stat().st_mtime < RUNNING_WINDOW_S
    except OSError:
        recent = False
    return "running?" if recent else "incomplete"


def load_run(run_dir: str | Path) -> RunData:
    """Everything a report needs from one run directory. Raises ``NotARunDir``."""
    path = Path(run_dir)
    summary_path, events_path = path / "summary.json", path / "events.jsonl"
    if not path.is_dir() or not (summary_path.is_file() or events_path.is_file()):
        raise NotARunDir(f"{run_dir} is not a run directory (it has no summary.json or events.jsonl)")
    events = read_events(events_path)
    tag_attempts(events)
    summary = _read_json(summary_path)
    has_summary = summary is not None
    if summary is None:
        summary = summary_from_events(events, _read_json(path / "plan.json"), _unfinished_status(events_path))
    data = RunData(path=path, summary=summary, has_summary=has_summary)
    for e in events:
        r = _rank_of(e)
        if r is None:
            continue
        if e["kind"] == "step" and isinstance(e.get("step"), (int, float)):
            data.steps.setdefault(r, []).append(e)
        elif e["kind"] == "memory":
            data.memory.setdefault(r, []).append(e)
    data.restarts = _restarts(events, summary)
    times = [t for t in map(_t, events) if t is not None]
    data.t0 = min(times) if times else None
    return data


# ----------------------------------------------------------------------------- derived numbers


def _nums(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def derived(summary: dict) -> dict:
    """The few numbers people ask of a run first, from its per-rank rows."""
    ranks = [r for r in summary.get("ranks") or [] if isinstance(r, dict)]
    mem = [r.get("memory") or {} for r in ranks]
    losses = _nums(r.get("last_loss") for r in ranks)
    rates = _nums(r.get("samples_per_s") for r in ranks)
    steps = _nums(r.get("steps") for r in ranks)
    mlx = _nums(m.get("mlx_peak_bytes") for m in mem)
    rss = _nums(m.get("rss_peak_bytes") for m in mem)
    attempts = summary.get("attempts")
    return {
        "final_loss": sum(losses) / len(losses) if losses else None,
        "steps": int(max(steps)) if steps else None,
        # every rank measures the job's global rate over its own step time; their mean is the job's
        "samples_per_s": sum(rates) / len(rates) if rates else None,
        "mlx_peak_bytes": int(max(mlx)) if mlx else None,
        "rss_peak_bytes": int(max(rss)) if rss else None,
        "restarts": max(len(attempts) - 1, 0) if isinstance(attempts, list) else 0,
    }


def final_json(summary: "str | Path | RunSummary") -> str:
    """``orch run --json``: the summary in one line, plus ``derived`` fields it does not already have.

    ``summary``: the run's ``RunSummary`` as ``run_job`` returned it (what
    ``orch run --json`` prints, from memory: the same content as summary.json),
    or the path of a summary.json or of its run directory.
    """
    if isinstance(summary, (str, Path)):
        p = Path(summary)
        if p.is_dir():
            p = p / "summary.json"
        summary = json.loads(p.read_text())
    else:
        summary = summary.model_dump(mode="json")  # exactly what rundir.write_summary writes
    out = dict(summary)
    for k, v in derived(summary).items():
        out.setdefault(k, v)
    return json.dumps(out, separators=(",", ":"))


# ----------------------------------------------------------------------------- formatting


def _num(x, fmt: str = "{:.4g}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def human_duration(s) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def _rank_cells(r: dict) -> list[str]:
    mem = r.get("memory") or {}
    ended = f"signal {r['signal']}" if r.get("signal") else _num(r.get("exit_code"), "{}")
    return [str(r.get("rank", "?")), str(r.get("host", "?")), ended, _num(r.get("steps"), "{}"),
            _num(r.get("last_loss")), _num(r.get("samples_per_s"), "{:,.1f}"),
            human_bytes(mem.get("mlx_peak_bytes")), human_bytes(mem.get("rss_peak_bytes"))]


RANK_HEADERS = ["rank", "host", "exit", "steps", "last loss", "samples/s", "mlx peak", "rss peak"]


PLAN_PLOT = "memory_plan.png"
PLAN_FIELDS = ("budget_bytes", "budget_source", "batch", "micro_batch", "pieces", "predicted_peak_bytes",
               "predicted_mlx_peak_bytes", "planned_peak_bytes", "fits")
PLAN_HEADERS = ["rank", "host", "budget", "batch", "micro x pieces", "predicted peak", "measured rss peak",
                "predicted mlx peak", "measured mlx peak"]


def _plan_rows(s: dict) -> list[list[str]]:
    """Per rank: the memory plan made before the first step next to the peaks the run then measured."""
    rows = []
    for r in s.get("ranks") or []:
        p = r.get("memory_plan") if isinstance(r, dict) else None
        if not isinstance(p, dict):
            continue
        mem = r.get("memory") or {}
        budget = human_bytes(p.get("budget_bytes")) + (f" ({p['budget_source']})" if p.get("budget_source") else "")
        rows.append([str(r.get("rank", "?")), str(r.get("host", "?")), budget, _num(p.get("batch"), "{}"),
                     f"{_num(p.get('micro_batch'), '{}')} x {_num(p.get('pieces'), '{}')}"
                     + ("" if p.get("fits", True) else " (refused)"),
                     human_bytes(p.get("predicted_peak_bytes")), human_bytes(mem.get("rss_peak_bytes")),
                     human_bytes(p.get("predicted_mlx_peak_bytes")), human_bytes(mem.get("mlx_peak_bytes"))])
    return rows


BALANCE_HEADERS = ["step", "why", "per-rank batch", "measured samples/s per rank", "predicted step (compute)"]


def _rebalance_rows(s: dict) -> list[list[str]]:
    """``--balance speed``: one row per change of the per-rank batches (summary's ``rebalances``)."""
    rows = []
    for b in s.get("rebalances") or []:
        if not isinstance(b, dict):
            continue
        speeds = b.get("speeds") or []
        before, after = b.get("previous_step_s"), b.get("predicted_step_s")
        pred = f"{_num(before, '{:.4g}')} s -> {_num(after, '{:.4g}')} s" if after is not None else "-"
        rows.append([_num(b.get("step"), "{}"), str(b.get("reason", "?")),
                     " : ".join(str(x) for x in b.get("shares") or []),
                     " : ".join(_num(x, "{:,.0f}") for x in speeds) or "-", pred])
    return rows


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _overview(data: RunData) -> list[tuple[str, str]]:
    s, d = data.summary, derived(data.summary)
    rows = [
        ("status", str(s.get("status", "?"))),
        ("exit code", _num(s.get("exit_code"), "{}")),
        ("failed rank", _num(s.get("failed_rank"), "{}")),
        ("reason", str(s.get("reason") or "-")),
        ("started", str(s.get("started_at") or "-")),
        ("duration", human_duration(s.get("duration_s"))),
        ("script", str(s.get("script") or "-")),
        ("backend", str(s.get("backend") or "-")),
        ("ranks", _num(s.get("world_size"), "{}")),
        ("steps", _num(d["steps"], "{}")),
        ("final loss (mean)", _num(d["final_loss"])),
        ("restarts", str(max(d["restarts"], len(data.restarts)))),
    ]
    if not data.has_summary:
        rows.insert(1, ("note", "no summary.json: the run is still going, or its controller was killed"))
    return rows


def format_summary(data: RunData) -> str:
    """The text `orch report` prints: overview, per-rank table, metrics."""
    lines = [f"{k:>18}: {v}" for k, v in _overview(data)]
    ranks = [r for r in data.summary.get("ranks") or [] if isinstance(r, dict)]
    if ranks:
        lines += ["", _text_table(RANK_HEADERS, [_rank_cells(r) for r in ranks])]
    if not data.steps:
        lines += ["", NO_STEPS]
    plans = _plan_rows(data.summary)
    if plans:
        lines += ["", "memory plan (predicted before the first step) vs measured:", _text_table(PLAN_HEADERS, plans)]
    balance = _rebalance_rows(data.summary)
    if balance:
        lines += ["", "batch shares (--balance speed):", _text_table(BALANCE_HEADERS, balance)]
    metrics = data.summary.get("metrics") or {}
    if metrics:
        lines += ["", "metrics: " + ", ".join(f"{k} {_num(v)}" for k, v in metrics.items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError(f"run reports need matplotlib ({e}); install it with: {INSTALL_HINT}") from None
    return Figure


def _mark_restarts(ax, restarts: list[Restart], t0: Optional[float], by_step: bool) -> None:
    for r in restarts:
        x = r.step if by_step else (r.t - t0 if r.t is not None and t0 is not None else None)
        if x is None:
            continue
        ax.axvline(x, color="red", linestyle="--", linewidth=1)
        label = f"restart {r.attempt}" + (f": {r.cause}" if r.cause else "")
        ax.annotate(label[:60], (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=7, color="red")


def _by_attempt(events: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        out[e["attempt"]].append(e)
    return out


def _step_plot(Figure, data: RunData, field_: str, ylabel: str, title: str, with_mean: bool, log_ok: bool = False):
    """One line per rank and attempt (a restart starts a new segment), plus the ranks' mean."""
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for rank in sorted(data.steps):
        for i, (_, evs) in enumerate(sorted(_by_attempt(data.steps[rank]).items())):
            pts = [(e["step"], e[field_]) for e in evs if _nums([e.get(field_)])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=f"C{rank % 10}", linewidth=1.2, zorder=2,
                        label=f"rank {rank}" if i == 0 else None)
    if with_mean and len(data.steps) > 1:
        groups: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for evs in data.steps.values():
            for e in evs:
                if _nums([e.get(field_)]):
                    groups[e["attempt"]][e["step"]].append(float(e[field_]))
        for i, (_, by_step) in enumerate(sorted(groups.items())):
            xs = sorted(by_step)
            # a wide grey band under the ranks' lines: when ranks agree (an all-reduced loss) they stay visible
            ax.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], color="0.4", linewidth=4, alpha=0.45,
                    zorder=1, label="mean" if i == 0 else None)
    ys = [float(e[field_]) for evs in data.steps.values() for e in evs if _nums([e.get(field_)])]
    if log_ok and ys and min(ys) > 0 and max(ys) / min(ys) >= 20:
        ax.set_yscale("log")  # losses fall by orders of magnitude; a linear axis hides the tail
    _mark_restarts(ax, data.restarts, data.t0, by_step=True)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return fig


def _byte_unit(peak: float) -> tuple[float, str]:
    for div, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if peak >= div:
            return float(div), name
    return 1.0, "B"


def _memory_plot(Figure, data: RunData):
    """MLX active/peak and process RSS per rank over the run's time; they differ by orders, so two panels."""
    fig = Figure(figsize=(8, 5.6), dpi=100, layout="constrained")
    ax_mlx, ax_rss = fig.subplots(2, 1, sharex=True)
    t0 = data.t0 or 0.0
    panels = ((ax_mlx, (("mlx_active_bytes", "-", "active"), ("mlx_peak_bytes", ":", "peak")), "MLX memory"),
              (ax_rss, (("rss_bytes", "-", "RSS"),), "process RSS"))
    for ax, series, title in panels:
        peak = max(_nums(e.get(k) for evs in data.memory.values() for e in evs for k, _, _ in series) or [0])
        div, unit = _byte_unit(peak)
        for rank in sorted(data.memory):
            for i, (_, evs) in enumerate(sorted(_by_attempt(data.memory[rank]).items())):
                for key, style, name in series:
                    pts = [(_t(e) - t0, e[key] / div) for e in evs if _t(e) is not None and _nums([e.get(key)])]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, linestyle=style, marker=".", color=f"C{rank % 10}",
                                label=f"rank {rank} {name}" if i == 0 else None)
        _mark_restarts(ax, data.restarts, data.t0, by_step=False)
        ax.set(ylabel=unit, title=title)
        # from 0: people read memory against a limit, and a zoomed axis makes noise look like a leak
        ax.set_ylim(0, peak / div * 1.12 if peak else 1)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    ax_rss.set_xlabel("seconds since the first event")
    return fig


def _plan_matters(r) -> bool:
    """Draw the plan when it did something: a user-set budget, a split micro-batch, a refusal (else the table says it)."""
    p = r.get("memory_plan") if isinstance(r, dict) else None
    return isinstance(p, dict) and (p.get("budget_source") == "hostfile memory_gb" or (p.get("pieces") or 1) > 1
                                    or p.get("fits") is False)


def _plan_plot(Figure, data: RunData):
    """Per rank, bars: its budget, the peak predicted before the first step, the RSS peak it reached."""
    ranks = [r for r in data.summary.get("ranks") or [] if isinstance(r, dict) and isinstance(r.get("memory_plan"), dict)]
    series = (("budget", lambda r: r["memory_plan"].get("budget_bytes")),
              ("predicted peak", lambda r: r["memory_plan"].get("predicted_peak_bytes")),
              ("measured RSS peak", lambda r: (r.get("memory") or {}).get("rss_peak_bytes")))
    values = [[(get(r) or 0) for r in ranks] for _, get in series]
    # A budget of all free memory dwarfs the peaks; draw it cut at 4x the largest peak, labelled with its value.
    top = max([v for vs in values[1:] for v in vs] or [1]) * 4
    div, unit = _byte_unit(min(max([v for vs in values for v in vs] or [1]), top))
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, ((name, _), vs) in enumerate(zip(series, values)):
        xs = [k + (i - 1) * width for k in range(len(ranks))]
        bars = ax.bar(xs, [min(v, top) / div for v in vs], width, label=name, color=f"C{i}")
        if i == 0:
            ax.bar_label(bars, labels=[human_bytes(v) if v else "-" for v in vs], fontsize=7)
    ax.set_xticks(range(len(ranks)), [f"rank {r.get('rank')}\n{r.get('host', '')}" for r in ranks])
    ax.set(ylabel=unit, title="Memory plan per rank")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def write_plots(data: RunData) -> list[tuple[str, Path]]:
    """PNGs in RUN_DIR/report/ for what the run recorded; returns (title, path) per plot written."""
    Figure = _figure_class()
    out = data.path / REPORT_DIR
    out.mkdir(exist_ok=True)
    for name in PLOT_NAMES:  # a plot from an earlier report must not outlive its data
        (out / name).unlink(missing_ok=True)
    (out / PLAN_PLOT).unlink(missing_ok=True)  # drawn only when a memory plan did something
    figs = []
    if data.steps:
        figs.append(("loss", "Loss vs step", _step_plot(Figure, data, "loss", "loss", "Loss", True, log_ok=True)))
        figs.append(("throughput", "Throughput vs step",
                     _step_plot(Figure, data, "samples_per_s", "samples/s", "Throughput (samples/s, as each rank measured it)", False)))
    if data.memory:
        figs.append(("memory", "Memory per rank over time", _memory_plot(Figure, data)))
    if any(_plan_matters(r) for r in data.summary.get("ranks") or []):
        figs.append(("memory_plan", "Memory plan: budget, predicted and measured peak per rank", _plan_plot(Figure, data)))
    written = []
    for name, title, fig in figs:
        path = out / f"{name}.png"
        fig.savefig(path, format="png")
        written.append((title, path))
    return written


# ----------------------------------------------------------------------------- HTML


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:900px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
th{background:#f3f3f3}.succeeded{color:#17692f}.failed{color:#b00020}.interrupted,.incomplete{color:#a15c00}
img{max-width:100%;border:1px solid #ddd}figure{margin:0 0 1.5em}.empty{color:#a15c00;font-weight:bold}"""

# Run by the browser: records on <body> how many images really decoded, so a headless DOM dump proves rendering.
_JS = """window.addEventListener("load",function(){var a=Array.prototype.slice.call(document.images);
var ok=a.filter(function(i){return i.complete&&i.naturalWidth>0}).length;
document.body.setAttribute("data-images-loaded",ok+"/"+a.length)});"""

# The page may load nothing from anywhere: a report copied off the cluster must still open, and must not phone home.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _html_table(headers: Optional[list[str]], rows: list[list[str]]) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def render_html(data: RunData, plots: list[tuple[str, Path]]) -> str:
    e = html.escape
    s = data.summary
    status = str(s.get("status", "?"))
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{e(data.path.name)}: {e(status)}</title><style>{_CSS}</style></head><body>",
        f'<h1>{e(data.path.name)} <span class="{e(status.rstrip("?"))}">{e(status)}</span></h1>',
        "<h2>Summary</h2>", _html_table(None, [[k, v] for k, v in _overview(data)]),
    ]
    attempts = [a for a in s.get("attempts") or [] if isinstance(a, dict)]
    if attempts or data.restarts:
        rows = [[_num(a.get("attempt"), "{}"), a.get("cause") or "-", a.get("started_at") or "-"] for a in attempts]
        if not rows:
            rows = [[str(r.attempt), r.cause or "-", _iso(r.t) if r.t else "-"] for r in data.restarts]
        parts += ["<h2>Attempts</h2>", _html_table(["attempt", "cause", "started"], rows)]
    ranks = [r for r in s.get("ranks") or [] if isinstance(r, dict)]
    parts += ["<h2>Ranks</h2>", _html_table(RANK_HEADERS, [_rank_cells(r) for r in ranks]) if ranks else "<p>no ranks recorded</p>"]
    plans = _plan_rows(s)
    if plans:
        parts += ["<h2>Memory plan: predicted vs measured peak</h2>", _html_table(PLAN_HEADERS, plans)]
    balance = _rebalance_rows(s)
    if balance:
        parts += ["<h2>Batch shares (--balance speed)</h2>", _html_table(BALANCE_HEADERS, balance)]
    metrics = s.get("metrics") or {}
    parts += ["<h2>Metrics</h2>",
              _html_table(["metric", "value"], [[k, _num(v)] for k, v in metrics.items()]) if metrics else "<p>no metrics reported</p>"]
    parts.append("<h2>Plots</h2>")
    if not data.steps:
        parts.append(f'<p class="empty">{NO_STEPS}</p>')
    for title, path in plots:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{e(title)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(title)} ({e(REPORT_DIR + '/' + path.name)})</figcaption></figure>")
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """RUN_DIR/report.html (self-contained: images inline) and the PNGs under RUN_DIR/report/.

    Raises ``NotARunDir`` for a path that is not a run, ``ReportError`` without matplotlib.
    """
    return _write(load_run(run_dir))


def _write(data: RunData) -> Path:
    from orchestrator.rundir import write_atomic  # the controller's writer: readers never see half a page

    plots = write_plots(data)
    path = data.path / REPORT_HTML
    write_atomic(path, render_html(data, plots))
    return path


# ----------------------------------------------------------------------------- orch runs


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
            events = _parse_lines(f.readline())
    except OSError:
        return None
    return _t(events[0]) if events else None


def read_row(run_dir: Path) -> Optional[RunRow]:
    """One line of `orch runs`, cheaply: summary.json, else the first line and tail of events.jsonl."""
    summary = _read_json(run_dir / "summary.json")
    events_path = run_dir / "events.jsonl"
    if summary is None:
        if not events_path.is_file():
            return None
        tail = read_events(events_path, TAIL_BYTES)
        summary = summary_from_events(tail, _read_json(run_dir / "plan.json"), _unfinished_status(events_path))
        first = _first_event_time(events_path)
        last = max((t for t in map(_t, tail) if t is not None), default=None)
        if first is not None and last is not None:  # the tail alone underestimates how long it has been going
            summary["duration_s"], summary["started_at"] = round(last - first, 3), _iso(first)
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
                  script=Path(script).name if isinstance(script, str) else None, started=started)


def list_runs(root: str | Path = "runs") -> list[RunRow]:
    """Every run directory directly under ``root`` (or ``root`` itself if it is one), newest first."""
    root = Path(root)
    if (root / "summary.json").is_file() or (root / "events.jsonl").is_file():
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
              _num(r.world_size, "{}"), _num(r.steps, "{}"), human_duration(r.duration_s), _num(r.final_loss),
              r.script or "-", _display_path(r.path)] for r in rows]
    return _text_table(headers, table)


# ----------------------------------------------------------------------------- entry points


def cmd_report(run_dir: str) -> int:
    """`orch report RUN_DIR`: write the report, print the summary and where the report is."""
    try:
        data = load_run(run_dir)
        path = _write(data)
    except NotARunDir as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return 2
    except ReportError as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return 1
    print(format_summary(data))
    print(f"\nreport: {path}  (plots in {path.parent / REPORT_DIR}/)")
    return 0


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
