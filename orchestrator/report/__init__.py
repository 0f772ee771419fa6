"""Run reports: what a run directory says, for people (HTML, PNG, text) and machines (JSON).

``orch report RUN_DIR`` writes RUN_DIR/report.html (self-contained) and its
PNGs under RUN_DIR/report/, and prints the text summary; ``orch run --json``
prints the summary with its derived figures (``final_json``). The parts:

  data.py    reading a run directory (events, summary, or one rebuilt from events)
  tables.py  derived figures and the tables, as text
  plots.py   the PNGs (matplotlib, the optional extra ``report``)
  html.py    the page
  runs.py    ``orch runs``

"report" means this one thing in the controller; a rank's progress API is
``orchestrator.runtime.report`` (what a program reports), and ``orch check``'s
table of results is ``health/verdicts.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import rundir
from orchestrator.report.data import NotARunDir, RunData, load_run
from orchestrator.report.html import render_html
from orchestrator.report.plots import ReportError, write_plots
from orchestrator.report.tables import derived, format_summary

if TYPE_CHECKING:
    from orchestrator.rundir import RunSummary


def final_json(summary: "str | Path | RunSummary") -> str:
    """``orch run --json``: the summary in one line, plus ``derived`` fields it does not already have.

    ``summary``: the run's ``RunSummary`` as ``run_job`` returned it (what
    ``orch run --json`` prints, from memory: the same content as summary.json),
    or the path of a summary.json or of its run directory.
    """
    if isinstance(summary, (str, Path)):
        p = Path(summary)
        if p.is_dir():
            p = p / rundir.SUMMARY
        summary = json.loads(p.read_text())
    else:
        summary = summary.model_dump(mode="json")  # exactly what rundir.write_summary writes
    out = dict(summary)
    for k, v in derived(summary).items():
        out.setdefault(k, v)
    return rundir.dumps(out, separators=(",", ":"))


def write_report(run_dir: str | Path) -> Path:
    """RUN_DIR/report.html (self-contained: images inline) and the PNGs under RUN_DIR/report/.

    Raises ``NotARunDir`` for a path that is not a run, ``ReportError`` without matplotlib.
    """
    return _write(load_run(run_dir))


def _write(data: RunData) -> Path:
    plots = write_plots(data)
    path = data.path / rundir.REPORT_HTML
    rundir.write_atomic(path, render_html(data, plots))  # readers never see half a page
    return path


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
    print(f"\nreport: {path}  (plots in {path.parent / rundir.REPORT_DIR}/)")
    return 0


