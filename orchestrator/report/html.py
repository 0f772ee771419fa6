"""report.html: one self-contained page (images inline, no network), readable from a copied run directory."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional

from orchestrator.report.data import RunData, iso
from orchestrator.report.tables import (BALANCE_HEADERS, NO_STEPS, PLAN_HEADERS, RANK_HEADERS, metric_value, num,
                                        overview, plan_rows, rank_cells, rebalance_rows)
from orchestrator.rundir import REPORT_DIR


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
        "<h2>Summary</h2>", _html_table(None, [[k, v] for k, v in overview(data)]),
    ]
    attempts = [a for a in s.get("attempts") or [] if isinstance(a, dict)]
    if attempts or data.restarts:
        rows = [[num(a.get("attempt"), "{}"), a.get("cause") or "-", a.get("started_at") or "-"] for a in attempts]
        if not rows:
            rows = [[str(r.attempt), r.cause or "-", iso(r.t) if r.t else "-"] for r in data.restarts]
        parts += ["<h2>Attempts</h2>", _html_table(["attempt", "cause", "started"], rows)]
    ranks = [r for r in s.get("ranks") or [] if isinstance(r, dict)]
    parts += ["<h2>Ranks</h2>", _html_table(RANK_HEADERS, [rank_cells(r) for r in ranks]) if ranks else "<p>no ranks recorded</p>"]
    plans = plan_rows(s)
    if plans:
        parts += ["<h2>Memory plan: predicted vs measured peak</h2>", _html_table(PLAN_HEADERS, plans)]
    balance = rebalance_rows(s)
    if balance:
        parts += ["<h2>Batch shares (--balance speed)</h2>", _html_table(BALANCE_HEADERS, balance)]
    metrics = s.get("metrics") or {}
    parts += ["<h2>Metrics</h2>",
              _html_table(["metric", "value"], [[k, metric_value(k, v)] for k, v in metrics.items()]) if metrics else "<p>no metrics reported</p>"]
    parts.append("<h2>Plots</h2>")
    if not data.steps:
        parts.append(f'<p class="empty">{NO_STEPS}</p>')
    for title, path in plots:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{e(title)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(title)} ({e(REPORT_DIR + '/' + path.name)})</figcaption></figure>")
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)


