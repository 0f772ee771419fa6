"""``orchestrator.programs``: mlx-lm's report lines become orch events.

The positive cases are real recordings (``tests/fixtures/mlx-lm/SOURCES.md``
says how each was made): mlx-lm 0.32's rich table, coloured even in a pipe,
and 0.31's plain ``Iter N: ...`` lines. The negative cases are lines that look
like them but are not theirs; none may become an event.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator import events as event_validation
from orchestrator.programs import ProgramOutput, strip_ansi

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mlx-lm"


def lines_of(name: str) -> list[str]:
    # As the supervisor reads a stream: whole lines, with their newline.
    return (FIXTURES / name).read_text(encoding="utf-8").splitlines(keepends=True)


class FakeClock:
    def __init__(self, start: float = 1000.0, tick: float = 1.0):
        self.t, self.tick = start, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def parse(lines: list[str], clock=None) -> list[dict]:
    out = ProgramOutput(clock=clock or FakeClock())
    return [e for line in lines for e in out.feed(line)]


def assert_valid(events: list[dict]) -> None:
    """Every event is what the supervisor accepts once it adds the rank and time."""
    for e in events:
        assert event_validation.validate({**e, "rank": 0, "t": time.time()}) is not None, e


# -- strip_ansi ----------------------------------------------------------------

def test_strip_ansi_leaves_the_text_mlx_lm_meant():
    raw = (FIXTURES / "lora-n2.stdout").read_text(encoding="utf-8")
    assert "\x1b[" in raw  # rich coloured it although stdout was a file
    clean = strip_ansi(raw)
    assert "\x1b" not in clean
    assert "  iter   train_loss     tok/s     tokens\n" in clean
    assert "     1    4.163 ▼      171      0.0k\n" in clean
    assert strip_ansi("plain text, 100% [ok]") == "plain text, 100% [ok]"


@pytest.mark.parametrize("raw, clean", [
    ("\x1b[1;38;5;244mgrey\x1b[0m", "grey"),
    ("\x1b[38;2;255;0;0mtruecolor\x1b[39m", "truecolor"),
    ("\x1b[2K\x1b[1Aredrawn", "redrawn"),                                    # erase line, cursor up
    ("\x1b]8;id=1;https://x.org\x1b\\link\x1b]8;;\x1b\\", "link"),            # OSC 8 hyperlink (rich)
    ("\x1b]0;title\x07after", "after"),                                       # OSC ended by BEL
    ("\x1b7saved\x1b8", "saved"),                                             # save/restore cursor
    ("a [not an escape] b", "a [not an escape] b"),
])
def test_strip_ansi_removes_each_kind_of_escape(raw, clean):
    assert strip_ansi(raw) == clean


# -- mlx-lm 0.32 (rich table) ---------------------------------------------------

def test_a_recorded_032_run_gives_start_steps_val_loss_and_finish():
    events = parse(lines_of("lora-n2.stdout"), clock=FakeClock(tick=1.0))
    assert_valid(events)
    assert [e["kind"] for e in events] == [
        "train_start", "metric", "step", "step", "step", "metric", "step", "finished"]
    assert events[0] == {"kind": "train_start", "step": 0, "total_steps": 4}  # iters from the header panel
    steps = [e for e in events if e["kind"] == "step"]
    assert [(s["step"], s["loss"], s["tokens_per_s"]) for s in steps] == [
        (1, 4.163, 171.0), (2, 4.438, 209.0), (3, 4.414, 559.0), (4, 4.447, 490.0)]
    assert all(s["total_steps"] == 4 and s["epoch"] == 0 for s in steps)
    vals = [e for e in events if e["kind"] == "metric"]
    assert [(v["step"], v["values"]) for v in vals] == [
        (1, {"val_loss": 4.34, "val_time_s": 0.12}), (4, {"val_loss": 4.308, "val_time_s": 0.19})]
    assert events[-1] == {"kind": "finished", "step": 4}


def test_step_time_is_wall_time_between_reports_without_validation_time():
    lines = lines_of("lora-n2-eval-save-test.stdout")
    # The clock ticks 1 s per line read; step rows report every 2 iterations.
    events = parse(lines, clock=FakeClock(tick=1.0))
    assert_valid(events)
    steps = {e["step"]: e for e in events if e["kind"] == "step"}
    assert sorted(steps) == [2, 4, 6, 8, 10, 12]
    # The rows of iterations 2 and 4 are adjacent lines: 1 s of fake clock over 2 iterations.
    assert steps[4]["step_time_s"] == pytest.approx(0.5)
    assert steps[4]["samples_per_s"] == pytest.approx(4.0)  # batch 2 (from the panel) per 0.5 s step
    # Between 4 and 6: a val row (0.06 s reported) and a save row: 3 s of clock, minus 0.06 s, over 2 iterations.
    assert steps[6]["step_time_s"] == pytest.approx((3.0 - 0.06) / 2)


def test_a_recorded_032_run_with_eval_save_and_test():
    events = parse(lines_of("lora-n2-eval-save-test.stdout"))
    assert_valid(events)
    checkpoints = [(e["step"], e["path"]) for e in events if e["kind"] == "checkpoint"]
    assert checkpoints == [(5, "0000005_adapters.safetensors"), (10, "0000010_adapters.safetensors")]
    metrics = [(e["step"], e["values"]) for e in events if e["kind"] == "metric"]
    assert [m for m in metrics if "val_loss" in m[1]] == [
        (1, {"val_loss": 4.448, "val_time_s": 0.24}), (5, {"val_loss": 4.217, "val_time_s": 0.06}),
        (10, {"val_loss": 4.317, "val_time_s": 0.06}), (12, {"val_loss": 4.051, "val_time_s": 0.16})]
    assert metrics[-1] == (12, {"test_loss": 4.04, "test_ppl": 56.841})
    kinds = [e["kind"] for e in events]
    assert kinds.index("finished") < len(kinds) - 1  # the test metric comes after training finished


def test_one_rank_stream_as_orch_reads_it():
    events = parse(lines_of("orch-lora-n2-rank0.log"))
    assert_valid(events)
    assert [(e["step"], e["loss"]) for e in events if e["kind"] == "step"] == [
        (1, 4.163), (2, 4.438), (3, 4.414), (4, 4.447)]


def test_a_failed_run_gives_no_events():
    assert parse(lines_of("failed-num-layers.stdout") + lines_of("failed-num-layers.stderr")) == []


# -- mlx-lm 0.31 (plain lines) --------------------------------------------------

def test_a_recorded_031_run_with_plain_iter_lines():
    events = parse(lines_of("lora-0.31.3-n2-eval-save-test.stdout"))
    assert_valid(events)
    # Both ranks print "Starting training..." in 0.31: one train_start all the same.
    assert [e for e in events if e["kind"] == "train_start"] == [{"kind": "train_start", "step": 0, "total_steps": 12}]
    steps = [e for e in events if e["kind"] == "step"]
    assert [(s["step"], s["loss"], s["tokens_per_s"]) for s in steps] == [
        (2, 4.301, 102.154), (4, 4.431, 702.109), (6, 4.103, 799.776),
        (8, 4.015, 755.502), (10, 4.158, 995.626), (12, 4.166, 1007.47)]
    assert steps[0]["step_time_s"] == pytest.approx(1 / 4.540)  # from It/sec, not the wall clock
    assert steps[0]["samples_per_s"] == 0.0  # 0.31 never prints the batch size: unknown, not invented
    first_extra = next(e for e in events if e["kind"] == "metric" and "learning_rate" in e["values"])
    assert first_extra == {"kind": "metric", "step": 2,
                           "values": {"learning_rate": 1e-05, "peak_memory_bytes": 0, "trained_tokens": 45}}
    vals = [(e["step"], e["values"]["val_loss"]) for e in events if e["kind"] == "metric" and "val_loss" in e["values"]]
    assert vals == [(1, 4.448), (5, 4.217), (10, 4.317), (12, 4.051)]
    assert [e["path"] for e in events if e["kind"] == "checkpoint"] == [
        "/tmp/mlxfx/ad7/0000005_adapters.safetensors", "/tmp/mlxfx/ad7/0000010_adapters.safetensors"]
    assert {"kind": "finished", "step": 12} in events


# -- strictness -----------------------------------------------------------------

HEADER = "  iter   train_loss     tok/s     tokens\n"


@pytest.mark.parametrize("line", [
    "     1    4.163 ↓        2      0.0k",      # another arrow
    "     1    4.163 ▼        2      0.0",       # no k
    "     1    4.163 ▼        2      0.0k  x",   # trailing text
    "     1    4.16 ▼        2      0.0k",       # two decimals
    "     1   4.163 ▼        2      0.0k",       # three spaces
    "  one    4.163 ▼        2      0.0k",
    "     1    4.163 ▼     2.5      0.0k",       # tok/s is printed as an integer
    "     1    4.163 ▼    1234      0.0k",       # ... with thousands separators
    "     1    val 4.448    0.05",               # no unit
    "     1    val 4.448    0.05s extra",
    "     1    VAL 4.448    0.05s",
    "  save  5_adapters.safetensors",            # the name has 7 digits
    "  save  0000005_adapters.npz",
    "train ████ 99% ·    11/12",                  # not finished
    "Iter 10: Train loss 2.345",                  # truncated
    "Iter 10: Train loss 2.345, It/sec 1.0",
    "Iter 10: Train loss 2.345, Learning Rate 1e-5, It/sec 1.000, Tokens/sec 2.000",  # lr not {:.3e}
    "Iter 10: Val loss 2.345, Val took 1.2s!",
    "Iter x: Val loss 2.345, Val took 1.200s",
    "iter 10: Val loss 2.345, Val took 1.200s",
    "Test loss 4.040, Test ppl 56.841",          # no full stop
    "Starting training..., iters: many",
    "     9" + "9" * 5000 + "    4.163 ▼        2      0.0k",  # absurd number: refused, not a crash
])
def test_lines_that_only_look_like_reports_are_not_parsed(line):
    assert parse([HEADER, line + "\n"])[1:] == []  # [0] is the header's train_start


@pytest.mark.parametrize("line", [
    "     1    4.163 ▼        2      0.0k",
    "     1    val 4.448    0.05s",
    "  save  0000005_adapters.safetensors",
    "train ██████████████████████████████ 100% ·     4/4",
])
def test_table_rows_count_only_after_mlx_lms_header(line):
    assert parse([line + "\n"]) == []
    assert parse([HEADER, line + "\n"])[1:] != []


@pytest.mark.parametrize("header", [
    "iter   train_loss     tok/s     tokens",
    "  iter train_loss tok/s tokens",
    "  iter   train_loss     tok/s     tokens   (mine)",
])
def test_only_mlx_lms_exact_header_opens_the_table(header):
    assert parse([header + "\n", "     1    4.163 ▼        2      0.0k\n"]) == []


def test_the_parser_steps_aside_for_a_rank_that_sends_its_own_events():
    out = ProgramOutput(clock=FakeClock())
    out.note_event({"kind": "ready", "size": 2})
    assert out.feed("Iter 2: Val loss 4.448, Val took 0.155s\n") != []
    out.note_event({"kind": "train_start", "step": 0, "total_steps": 5})
    assert out.feed("Iter 3: Val loss 4.448, Val took 0.155s\n") == []
    assert out.feed(HEADER) == []


def test_values_are_exact_numbers_with_thousands_separators():
    events = parse([
        "│    batch · iters   16 · 1,000      │\n", HEADER,
        "  1000    0.125 ▲    12,345    1234.5k\n",
        "  1000    val   nan    12.50s\n",
    ])
    assert events[0] == {"kind": "train_start", "step": 0, "total_steps": 1000}
    step = events[1]
    assert (step["step"], step["loss"], step["tokens_per_s"], step["total_steps"]) == (1000, 0.125, 12345.0, 1000)
    assert events[2]["kind"] == "metric" and events[2]["values"]["val_time_s"] == 12.5
    assert events[2]["values"]["val_loss"] != events[2]["values"]["val_loss"]  # nan, as mlx-lm printed it


# -- against the installed mlx-lm -------------------------------------------------

@pytest.mark.slow
def test_the_installed_mlx_lm_trains_on_the_local_fixture_and_its_lines_parse(tmp_path):
    """The parser keeps up with the mlx-lm the test extra installs (no network, no Hub)."""
    import os
    import subprocess
    import sys

    from tests import mlxlm_fixture

    fx = mlxlm_fixture.build(tmp_path / "fx")
    adapters = tmp_path / "adapters"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "ORCH_"))}
    env.update(mlxlm_fixture.OFFLINE_ENV)
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", *fx.lora_args(adapters, iters=4)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (adapters / "adapters.safetensors").is_file()
    events = parse(proc.stdout.splitlines(keepends=True))
    assert_valid(events)
    assert events[0] == {"kind": "train_start", "step": 0, "total_steps": 4}
    steps = [e for e in events if e["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(0 < s["loss"] < 20 and s["tokens_per_s"] > 0 for s in steps)
    assert [e["step"] for e in events if e["kind"] == "metric"] == [1, 4]  # val at the first and last iteration
    assert events[-1] == {"kind": "finished", "step": 4}


@pytest.mark.slow
def test_unmodified_mlx_lm_lora_under_orch_two_ranks(tmp_path):
    """orch runs the console script on 2 ranks; rank 0's log reads as the same steps.

    The form used is the one orch accepts today (the console script's path);
    the log may hold ANSI codes or not, the parser reads both.
    """
    import sysconfig

    from tests import mlxlm_fixture
    from tests.orch_helpers import run_orch, summary

    script = Path(sysconfig.get_path("scripts")) / "mlx_lm.lora"
    assert script.is_file(), f"{script}: the test extra installs mlx-lm"
    fx = mlxlm_fixture.build(tmp_path / "fx")
    run_dir, adapters = tmp_path / "run", tmp_path / "adapters"
    env = dict(mlxlm_fixture.OFFLINE_ENV)
    r = run_orch("run", "-n", "2", "--run-dir", str(run_dir), str(script), "--",
                 *fx.lora_args(adapters, iters=4), cwd=tmp_path, env=env, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(run_dir)["status"] == "succeeded"
    assert (adapters / "adapters.safetensors").is_file()
    events = parse((run_dir / "logs" / "rank-0.log").read_text(encoding="utf-8").splitlines(keepends=True))
    assert_valid(events)
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4]
    assert events[0]["total_steps"] == 4 and events[-1] == {"kind": "finished", "step": 4}
