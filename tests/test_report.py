"""Run reports: a real run's HTML and PNGs (decoded, not blank, rendered by headless Chromium),
`orch runs` over synthetic run directories, failed-early and restarted runs, and the entry points."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator import report
from orchestrator.report import data as report_data, plots as report_plots, runs, tables as report_tables
from tests.orch_helpers import RECIPES, ROOT, run_orch

np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DATA_PNG = "data:image/png;base64,"


# ----------------------------------------------------------------------------- helpers


def png_stats(raw: bytes) -> tuple[tuple[int, int], float, float]:
    """(size, grey-level standard deviation, fraction of pixels that are not near-white)."""
    img = Image.open(io.BytesIO(raw))
    img.load()
    grey = np.asarray(img.convert("L"), dtype=np.float32)
    return img.size, float(grey.std()), float((grey < 200).mean())


def assert_not_blank(raw: bytes, min_size=(400, 200)) -> None:
    size, std, ink = png_stats(raw)
    assert size[0] >= min_size[0] and size[1] >= min_size[1], size
    assert std > 10 and ink > 0.005, f"looks blank: grey std {std:.1f}, non-white fraction {ink:.4f}"


def colour_pixels(raw: bytes) -> int:
    """Pixels that are clearly coloured: data lines (axes, text and grid are grey)."""
    rgb = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)
    return int((rgb.max(-1) - rgb.min(-1) > 60).sum())


def assert_plotted(raw: bytes) -> None:
    """Not blank, and with data drawn on it, not just empty axes (a legend alone is ~100 coloured pixels)."""
    assert_not_blank(raw)
    assert colour_pixels(raw) > 500, colour_pixels(raw)


def red_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Headless Chromium with its own throwaway profile; bounded, and the profile is always removed."""
    profile = tempfile.mkdtemp(prefix="orch-chromium-")
    try:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


needs_chromium = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                    reason=f"{CHROMIUM} not installed (scripts/test.sh installs Debian's chromium)")


def write_run(path: Path, summary: dict | None = None, events: list[dict] = (), plan: dict | None = None,
              torn_tail: bool = False) -> Path:
    path.mkdir(parents=True)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if plan is not None:
        (path / "plan.json").write_text(json.dumps(plan))
    if events or torn_tail:
        text = "".join(json.dumps(e) + "\n" for e in events)
        (path / "events.jsonl").write_text(text + ('{"kind":"step","rank":0,"t":1' if torn_tail else ""))
    return path


def rank_row(rank: int, steps=None, loss=None, rate=None, code=0, mem=True) -> dict:
    row = {"rank": rank, "host": "localhost", "pid": 100 + rank, "exit_code": code, "signal": None,
           "steps": steps, "last_loss": loss, "samples_per_s": rate, "memory": None}
    if mem:
        row["memory"] = {"mlx_peak_bytes": 3 << 20, "mlx_active_bytes": 1 << 20, "mlx_cache_bytes": 0,
                         "rss_peak_bytes": 200 << 20, "system_available_min_bytes": None,
                         "metal_max_recommended_working_set_size": None}
    return row


def summary_doc(status: str, started_at: str, ranks: list[dict], exit_code=0, failed_rank=None, reason=None,
                script="/x/recipes/train.py", duration=12.5, **extra) -> dict:
    return {"status": status, "exit_code": exit_code, "failed_rank": failed_rank, "reason": reason,
            "duration_s": duration, "started_at": started_at, "script": script, "backend": "ring",
            "world_size": len(ranks), "run_dir": "/somewhere", "ranks": ranks, "metrics": {}, **extra}


def step_events(rank: int, steps: range, t0: float, attempt: int | None = None, loss0: float = 2.0) -> list[dict]:
    out = []
    for s in steps:
        e = {"kind": "step", "rank": rank, "t": t0 + s * 0.1, "recv_t": t0 + s * 0.1, "from_rank": rank, "step": s,
             "epoch": 0, "loss": loss0 / s, "samples_per_s": 1000.0 + 10 * s + rank, "tokens_per_s": None,
             "step_time_s": 0.1, "total_steps": 30}
        if attempt is not None:
            e["attempt"] = attempt
        out.append(e)
        if s % 5 == 0:
            m = {"kind": "memory", "rank": rank, "t": t0 + s * 0.1 + 0.01, "from_rank": rank, "step": s,
                 "mlx_active_bytes": (1 + s) << 16, "mlx_peak_bytes": (2 + s) << 16, "mlx_cache_bytes": 0,
                 "rss_bytes": (100 + s) << 20, "system_available_bytes": 1 << 33, "metal_memory_size": None,
                 "metal_max_recommended_working_set_size": None}
            if attempt is not None:
                m["attempt"] = attempt
            out.append(m)
    return out


def spawned(rank: int, t: float, **extra) -> dict:
    return {"kind": "spawned", "rank": rank, "t": t, "recv_t": t, "from_rank": rank, "pid": 1000 + rank,
            "host": "vm", **extra}


# ----------------------------------------------------------------------------- a real run, once per module


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real 2-rank `orch run` of the MLP recipe, and its report."""
    tmp = tmp_path_factory.mktemp("report-real")
    rd = tmp / "runs" / "mlp"
    t0 = time.monotonic()
    r = run_orch("run", str(RECIPES / "mlp_regression.py"), "-n", "2", "--quiet", "--run-dir", str(rd),
                 "--", "--steps", "40", "--stats-every", "5", cwd=tmp, timeout=150)
    assert r.returncode == 0, r.stderr
    t1 = time.monotonic()
    html_path = report.write_report(rd)
    print(f"\n[timing] orch run {t1 - t0:.1f}s, write_report {time.monotonic() - t1:.1f}s")
    yield rd, html_path
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_report_html_is_self_contained_with_the_plots_inline(real_run):
    rd, html_path = real_run
    assert html_path == rd / "report.html" and html_path.is_file()
    page = html_path.read_text()
    refs = re.findall(r"""\b(?:src|href|action|poster)\s*=\s*["']?([^"'\s>]+)""", page, re.I)
    assert refs and all(ref.startswith(DATA_PNG) for ref in refs), [r[:60] for r in refs]
    assert not re.search(r"<link\b|@import|url\(|<iframe\b|<object\b|https?://", page, re.I)
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) >= 3
    files = {p.name: p.read_bytes() for p in (rd / "report").glob("*.png")}
    assert set(files) == {"loss.png", "throughput.png", "memory.png"}
    # the page embeds exactly the PNG files, and each one decodes to a real, non-blank picture
    assert sorted(base64.b64decode(b) for b in imgs) == sorted(files.values())
    for name, raw in files.items():
        assert len(raw) > 10_000, name
        assert_plotted(raw)


@pytest.mark.slow
def test_report_tables_match_the_summary(real_run):
    rd, html_path = real_run
    page = html_path.read_text()
    s = json.loads((rd / "summary.json").read_text())
    assert '<span class="succeeded">succeeded</span>' in page
    for r in s["ranks"]:
        assert f"<td>{r['rank']}</td><td>localhost</td><td>0</td><td>40</td><td>{r['last_loss']:.4g}</td>" in page
    mean_loss = sum(r["last_loss"] for r in s["ranks"]) / 2
    assert f"<td>final loss (mean)</td><td>{mean_loss:.4g}</td>" in page
    assert report_tables.NO_STEPS not in page
    # the runtime may report metrics of its own (e.g. optimizer_state_bytes); each is in the page, or none is
    assert all(f"<td>{name}</td>" in page for name in s["metrics"]) if s["metrics"] else "no metrics reported" in page


@pytest.mark.slow
def test_memory_plot_is_read_by_matplotlib_too(real_run):
    import matplotlib.image as mpimg

    rd, _ = real_run
    arr = mpimg.imread(rd / "report" / "memory.png")
    assert arr.shape[0] >= 400 and arr.shape[1] >= 600 and arr[..., :3].std() > 0.05


@pytest.mark.slow
@needs_chromium
def test_chromium_renders_every_image(real_run):
    rd, html_path = real_run
    t0 = time.monotonic()
    dom = chromium("--dump-dom", html_path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    # set by the page's own script after load, from img.complete && naturalWidth > 0
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert m, dom.stdout[:500]
    assert int(m.group(1)) == int(m.group(2)) >= 3
    assert len(re.findall(r"<img\b", dom.stdout)) == int(m.group(2))

    shot = rd / "chromium-shot.png"
    r = chromium("--window-size=1000,2600", f"--screenshot={shot}", html_path.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert_not_blank(shot.read_bytes(), min_size=(1000, 2600))
    # the plots are in the picture, not only the text: the lower half (plots) carries colour
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    lower = rgb[1300:]
    colourful = (np.abs(lower[..., 0] - lower[..., 2]) > 60).mean()
    assert colourful > 0.001, colourful
    print(f"\n[timing] chromium dump-dom + screenshot {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_cmd_report_runs_and_final_json_on_the_real_run(real_run, capsys):
    rd, _ = real_run
    assert report.cmd_report(str(rd)) == 0
    out = capsys.readouterr().out
    assert "status: succeeded" in out and f"report: {rd / 'report.html'}" in out
    assert re.search(r"^1\s+localhost\s+0\s+40\s", out, re.M), out

    assert runs.cmd_runs(str(rd.parent), 10) == 0
    out = capsys.readouterr().out
    assert re.search(r"succeeded\s+2\s+40\s+\S+\s+[\d.]+\s+mlp_regression\.py\s", out), out

    doc = json.loads(report.final_json(rd / "summary.json"))
    s = json.loads((rd / "summary.json").read_text())
    assert {k: doc[k] for k in s} == s
    assert doc["steps"] == 40 and doc["restarts"] == 0
    assert doc["final_loss"] == pytest.approx(sum(r["last_loss"] for r in s["ranks"]) / 2)
    assert doc["mlx_peak_bytes"] == max(r["memory"]["mlx_peak_bytes"] for r in s["ranks"])
    assert "\n" not in report.final_json(rd)  # a run dir works too, and it is one line


# ----------------------------------------------------------------------------- synthetic run directories


def test_byte_metrics_read_as_sizes_and_the_rest_as_numbers():
    assert report_tables.metric_value("bytes_sent_per_step", 3 * 2**20) == "3.0 MiB"
    assert report_tables.metric_value("optimizer_state_bytes", 511236) == "499.3 KiB"
    assert report_tables.metric_value("val_loss", 2.34151) == "2.342"
    assert report_tables.metric_value("bytes_sent_per_step", None) == "-"
    assert report_tables.metric_value("link_bytes_per_s", 1.5e9) == report_tables.num(1.5e9)  # a rate, not a size


def test_failed_early_run_still_gets_a_report(tmp_path):
    rd = write_run(tmp_path / "early", summary_doc(
        "failed", "2026-01-01T00:00:00Z", [rank_row(0, code=1, mem=False), rank_row(1, code=None, mem=False)],
        exit_code=1, failed_rank=0, reason="rank 0 (localhost) exited with code 1", duration=0.4),
        events=[spawned(0, 1.0), spawned(1, 1.0)])
    (rd / "report").mkdir()
    (rd / "report" / "loss.png").write_bytes(b"stale")  # from an earlier report: must not survive
    page = report.write_report(rd).read_text()
    assert report_tables.NO_STEPS in page and "<img" not in page
    assert '<span class="failed">failed</span>' in page and "rank 0 (localhost) exited with code 1" in page
    assert "<td>failed rank</td><td>0</td>" in page
    assert not list((rd / "report").glob("*.png"))


def test_report_of_a_run_without_any_events(tmp_path, capsys):
    rd = write_run(tmp_path / "noevents", summary_doc("failed", "2026-01-01T00:00:00Z", [], exit_code=1,
                                                      reason="could not start: ssh refused"))
    assert report.cmd_report(str(rd)) == 0
    out = capsys.readouterr().out
    assert report_tables.NO_STEPS in out and "could not start: ssh refused" in out
    assert "no ranks recorded" in (rd / "report.html").read_text()


def test_a_damaged_summary_is_said_to_be_damaged_not_missing(tmp_path, capsys):
    rd = write_run(tmp_path / "damaged", summary_doc("succeeded", "2026-01-01T00:00:00Z", [rank_row(0)]),
                   events=[spawned(0, 1.0)])
    (rd / "summary.json").write_text('{"status": 5')  # cut short
    assert report.cmd_report(str(rd)) == 0
    out = capsys.readouterr().out
    assert "summary.json cannot be read (not a JSON object): this report is built from events.jsonl" in out
    assert "no summary.json" not in out


def test_html_escapes_what_ranks_and_recipes_wrote(tmp_path):
    rd = write_run(tmp_path / "esc", summary_doc("failed", "2026-01-01T00:00:00Z", [rank_row(0, code=1)],
                                                 exit_code=1, reason='<img src="http://evil/x">'))
    page = report.write_report(rd).read_text()
    assert "http://evil" not in page.split("&lt;img")[0] and '<img src="http' not in page


@pytest.mark.parametrize("explicit", [True, False], ids=["attempt-fields", "inferred-from-respawn"])
def test_restarts_are_found_and_marked(tmp_path, explicit):
    t0 = 1_700_000_000.0
    a0 = [spawned(r, t0, **({"attempt": 0} if explicit else {})) for r in (0, 1)]
    a0 += [e for r in (0, 1) for e in step_events(r, range(1, 21), t0, 0 if explicit else None)]
    a1 = [spawned(r, t0 + 5, **({"attempt": 1} if explicit else {})) for r in (0, 1)]
    a1 += [e for r in (0, 1) for e in step_events(r, range(11, 31), t0 + 4, 1 if explicit else None, loss0=1.0)]
    attempts = [{"attempt": 0, "cause": "start", "started_at": "2026-01-01T00:00:00Z"},
                {"attempt": 1, "cause": "rank 1 exited with code 9", "started_at": "2026-01-01T00:00:05Z"}]
    extra = {"attempts": attempts} if explicit else {}
    rd = write_run(tmp_path / "restarted", summary_doc(
        "succeeded", "2026-01-01T00:00:00Z", [rank_row(0, 30, 0.03, 1300.0), rank_row(1, 30, 0.03, 1301.0)], **extra),
        events=a0 + a1)

    data = report.load_run(rd)
    assert [(r.attempt, r.step) for r in data.restarts] == [(1, 11)]
    assert data.restarts[0].t == pytest.approx(t0 + 5, abs=1e-3)  # its first event: the respawn
    assert data.restarts[0].cause == ("rank 1 exited with code 9" if explicit else None)
    page = report.write_report(rd).read_text()
    assert "<h2>Attempts</h2>" in page and "<td>restarts</td><td>1</td>" in page
    if explicit:
        assert "rank 1 exited with code 9" in page
    # the restart is drawn: a red dashed line in every plot, and none in a run without restarts
    for name in report_plots.PLOT_NAMES:
        assert red_pixels(rd / "report" / name) > 100, name
        assert_plotted((rd / "report" / name).read_bytes())
    plain = write_run(tmp_path / "plain", summary_doc("succeeded", "2026-01-01T00:00:00Z", [rank_row(0, 20, 0.1, 1000.0)]),
                      events=[spawned(0, t0)] + step_events(0, range(1, 21), t0))
    report.write_report(plain)
    assert all(red_pixels(plain / "report" / n) < 20 for n in report_plots.PLOT_NAMES)
    assert json.loads(report.final_json(rd))["restarts"] == (1 if explicit else 0)


def test_list_runs_newest_first_with_failed_interrupted_and_incomplete(tmp_path):
    root = tmp_path / "runs"
    now = time.time()
    write_run(root / "a-ok", summary_doc("succeeded", "2026-01-01T10:00:00Z",
                                          [rank_row(0, 100, 0.5, 900.0), rank_row(1, 100, 0.7, 950.0)], duration=75))
    write_run(root / "b-failed", summary_doc("failed", "2026-01-01T11:00:00Z",
                                              [rank_row(0, 7, 1.5, code=-9), rank_row(1, 6, 1.7, code=1)],
                                              exit_code=1, failed_rank=1, script="/x/recipes/char_lm.py"))
    write_run(root / "c-interrupted", summary_doc("interrupted", "2026-01-01T12:00:00Z", [rank_row(0, 3, 2.0)],
                                                   exit_code=130, duration=4000))
    # controller killed: no summary, a torn last line; its events are the newest
    incomplete = write_run(root / "d-incomplete", events=[spawned(0, now - 30), spawned(1, now - 30)]
                           + step_events(0, range(1, 13), now - 29) + step_events(1, range(1, 12), now - 29),
                           plan={"backend": "ring", "world_size": 2, "ranks": []}, torn_tail=True)
    write_run(root / "e-junk")                        # neither summary nor events: not a run
    (root / "e-junk" / "notes.txt").write_text("hi")
    (root / "stray-file.txt").write_text("not a dir")
    old = now - 3 * report_data.RUNNING_WINDOW_S
    stale = write_run(root / "f-stale", events=[spawned(0, old)] + step_events(0, range(1, 3), old))
    os.utime(stale / "events.jsonl", (old, old))

    rows = runs.list_runs(root)
    assert [r.path.name for r in rows] == ["d-incomplete", "f-stale", "c-interrupted", "b-failed", "a-ok"]
    by = {r.path.name: r for r in rows}
    assert (by["a-ok"].status, by["a-ok"].world_size, by["a-ok"].steps) == ("succeeded", 2, 100)
    assert by["a-ok"].final_loss == pytest.approx(0.6) and by["a-ok"].script == "train.py"
    assert (by["b-failed"].status, by["b-failed"].steps, by["b-failed"].script) == ("failed", 7, "char_lm.py")
    assert by["c-interrupted"].status == "interrupted" and by["c-interrupted"].duration_s == 4000
    d = by["d-incomplete"]
    assert (d.status, d.world_size, d.steps) == ("running?", 2, 12)
    assert d.final_loss == pytest.approx((2.0 / 12 + 2.0 / 11) / 2)
    assert d.duration_s == pytest.approx(1 + 1.2, abs=0.02)  # first spawned .. last step
    assert by["f-stale"].status == "incomplete"

    text = runs.format_runs(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["started", "status", "ranks", "steps", "duration", "loss", "script", "path"]
    assert len(lines) == 6 and "running?" in lines[1] and "1h06m" in lines[3]
    assert str(incomplete) in lines[1]

    # an incomplete run still gets a report, rebuilt from its events
    page = report.write_report(incomplete).read_text()
    assert "no summary.json" in page and page.count(DATA_PNG) == 3


def test_cmd_runs_limit_and_empty_and_missing(tmp_path, capsys):
    for i in range(3):
        write_run(tmp_path / f"r{i}", summary_doc("succeeded", f"2026-01-0{i + 1}T00:00:00Z", [rank_row(0, i, 1.0)]))
    assert runs.cmd_runs(str(tmp_path), 2) == 0
    out = capsys.readouterr().out
    assert "r2" in out and "r1" in out and "r0" not in out and "(1 older runs not shown)" in out
    (tmp_path / "empty").mkdir()
    assert runs.cmd_runs(str(tmp_path / "empty"), 5) == 0
    assert "no runs under" in capsys.readouterr().out
    assert runs.cmd_runs(str(tmp_path / "nope"), 5) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_not_a_run_dir_is_one_line_and_exit_2(tmp_path, capsys):
    for bad in (tmp_path / "missing", tmp_path):
        assert report.cmd_report(str(bad)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("orch: error: ") and "not a run directory" in err
    with pytest.raises(report.NotARunDir):
        report.write_report(tmp_path)


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    rd = write_run(tmp_path / "r", summary_doc("succeeded", "2026-01-01T00:00:00Z", [rank_row(0, 1, 1.0)]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(report.ReportError, match=re.escape('pip install "mlx-orch[report]"')):
        report.write_report(rd)
    assert report.cmd_report(str(rd)) == 1
    assert 'pip install "mlx-orch[report]"' in capsys.readouterr().err
    assert not (rd / "report.html").exists()


def test_the_controller_side_does_not_import_matplotlib_or_mlx():
    code = ("import sys, orchestrator.report; bad = [m for m in ('matplotlib', 'mlx') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runs_reads_only_the_tail_of_a_long_unfinished_run(tmp_path, monkeypatch):
    t0 = 1_700_000_000.0
    events = [spawned(0, t0)] + step_events(0, range(1, 200), t0 + 1)
    rd = write_run(tmp_path / "long", events=events)
    monkeypatch.setattr(runs, "TAIL_BYTES", 2000)  # a few events, starting mid-line
    row = runs.read_row(rd)
    assert row.steps == 199 and row.final_loss == pytest.approx(2.0 / 199)
    assert row.duration_s == pytest.approx(1 + 19.9, abs=0.02)  # from the file's first line, not the tail's
    assert row.started == pytest.approx(t0, abs=1e-3) and row.status == "running?"  # just written
