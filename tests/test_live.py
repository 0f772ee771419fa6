"""The live view: progress arithmetic, in-place redraw on a terminal, plain lines otherwise."""

import io
import time

from orchestrator.launch.base import ExitStatus, RankSpec
from orchestrator.live import LiveView, fmt_eta, human_bytes
from orchestrator.rundir import MemorySummary
from orchestrator.supervisor import RankState


def states(n=2):
    out = []
    for r in range(n):
        s = RankState(spec=RankSpec(rank=r, host=f"mac{r}", script="x.py"))
        out.append(s)
    return out


def step(view, st, k, total=100, loss=0.5):
    st.record.steps, st.record.total_steps, st.record.last_loss, st.record.samples_per_s = k, total, loss, 1234.0
    view.on_event(st, {"kind": "step", "step": k})


def test_progress_uses_the_slowest_rank_and_estimates_eta(monkeypatch):
    ss = states()
    view = LiveView(ss, err=io.StringIO(), tty=False)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    step(view, ss[0], 10)
    step(view, ss[1], 10)
    clock[0] = 110.0  # 10 more steps took 10 s
    step(view, ss[0], 30)
    step(view, ss[1], 20)
    s, total, eta = view.progress()
    assert (s, total) == (20, 100)
    assert abs(eta - 80.0) < 1e-6  # 10 steps / 10 s, 80 steps to go


def test_terminal_block_is_cleared_before_output_and_redrawn_after():
    ss = states()
    err = io.StringIO()
    view = LiveView(ss, err=err, tty=True, redraw_every_s=0)
    step(view, ss[0], 5)
    drawn = err.getvalue()
    assert "5/100" in drawn and "mac1" in drawn
    with view.around_output():
        err.write("[0] hello\n")
    after = err.getvalue()[len(drawn):]
    assert after.startswith("\x1b[4F\x1b[J[0] hello\n")  # block (bar + header + 2 ranks) erased first
    assert "5/100" in after.split("[0] hello\n")[1]  # and drawn again below the line


def test_plain_lines_when_not_a_terminal():
    ss = states(1)
    err = io.StringIO()
    view = LiveView(ss, err=err, tty=False, plain_every_s=3600)
    step(view, ss[0], 1)
    step(view, ss[0], 2)  # throttled
    assert err.getvalue().count("orch: step") == 1 and "\x1b" not in err.getvalue()


def test_final_table_has_memory_and_throughput():
    ss = states()
    ss[0].record.memory = MemorySummary(mlx_peak_bytes=3 * 2**20, rss_peak_bytes=2**30, system_available_min_bytes=5 * 2**30)
    ss[0].record.steps, ss[0].record.samples_per_s, ss[0].record.last_loss = 10, 2500.0, 0.25
    ss[1].status = ExitStatus(code=0, signal=None)
    table = LiveView(ss, err=io.StringIO(), tty=False).final_table()
    assert "3.0 MiB" in table and "1.0 GiB" in table and "2.5k" in table and "0.25" in table


def test_formatting_helpers():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB"
    assert fmt_eta(3725) == "1:02:05" and fmt_eta(65) == "1:05" and fmt_eta(None) == "--:--"
