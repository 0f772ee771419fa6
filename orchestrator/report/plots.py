"""The report's PNGs: loss and throughput per step, memory over time, the memory plan.

matplotlib is the optional extra ``report`` and is imported only when a plot
is drawn: the controller starts on laptops without it and must start fast.
Plots use ``matplotlib.figure.Figure`` directly (the Agg canvas), never
pyplot, so no GUI backend or global figure state is ever touched.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

from orchestrator.report.data import Restart, RunData, event_time, nums
from orchestrator.rundir import REPORT_DIR
from orchestrator.units import human_bytes

PLOT_NAMES = ("loss.png", "throughput.png", "memory.png")
PLAN_PLOT = "memory_plan.png"
INSTALL_HINT = 'pip install "mlx-orch[report]"'


class ReportError(RuntimeError):
    """The report cannot be made here (matplotlib missing)."""


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
            pts = [(e["step"], e[field_]) for e in evs if nums([e.get(field_)])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=f"C{rank % 10}", linewidth=1.2, zorder=2,
                        label=f"rank {rank}" if i == 0 else None)
    if with_mean and len(data.steps) > 1:
        groups: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for evs in data.steps.values():
            for e in evs:
                if nums([e.get(field_)]):
                    groups[e["attempt"]][e["step"]].append(float(e[field_]))
        for i, (_, by_step) in enumerate(sorted(groups.items())):
            xs = sorted(by_step)
            # a wide grey band under the ranks' lines: when ranks agree (an all-reduced loss) they stay visible
            ax.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], color="0.4", linewidth=4, alpha=0.45,
                    zorder=1, label="mean" if i == 0 else None)
    ys = [float(e[field_]) for evs in data.steps.values() for e in evs if nums([e.get(field_)])]
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
        peak = max(nums(e.get(k) for evs in data.memory.values() for e in evs for k, _, _ in series) or [0])
        div, unit = _byte_unit(peak)
        for rank in sorted(data.memory):
            for i, (_, evs) in enumerate(sorted(_by_attempt(data.memory[rank]).items())):
                for key, style, name in series:
                    pts = [(event_time(e) - t0, e[key] / div) for e in evs if event_time(e) is not None and nums([e.get(key)])]
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


