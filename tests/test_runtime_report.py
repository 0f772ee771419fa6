"""``orchestrator.runtime.report``: progress events from programs that are not orch recipes.

The end-to-end tests run a real script in a subprocess with ``ORCH_EVENTS=1``
(as a rank under orch) and read its stdout exactly as the supervisor does:
``protocol.split_line`` per line, then the controller's validator. The unit
tests drive the module in-process with a fake clock to check the arithmetic.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from orchestrator import events as event_validation
from orchestrator import protocol

ROOT = Path(__file__).resolve().parent.parent


def _env(events: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "MLX_", "OMPI_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if events:
        env["ORCH_EVENTS"] = "1"
    return env


def run_script(tmp_path: Path, source: str, *, events: bool = True, rank: int | None = None) -> tuple[list[dict], list[str], subprocess.CompletedProcess]:
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(source))
    env = _env(events)
    if rank is not None:
        env["MLX_RANK"] = str(rank)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    payloads, text = [], []
    for line in proc.stdout.split("\n"):  # not splitlines(): "\x1e" would split the marker
        user, payload = protocol.split_line(line)
        if user:
            text.append(user)
        if payload is not None:
            payloads.append(payload)
    return payloads, text, proc


def test_from_import_resolves_the_submodule_and_unknown_names_still_fail():
    import orchestrator.runtime as runtime
    from orchestrator.runtime import report

    assert report.__name__ == "orchestrator.runtime.report"
    assert callable(report.step) and callable(report.phase)
    with pytest.raises(AttributeError):
        runtime.no_such_thing  # noqa: B018 - the lazy __getattr__ must still refuse unknown names
    with pytest.raises(ImportError):
        from orchestrator.runtime import no_such_thing  # noqa: F401


def test_a_script_reports_steps_metrics_and_phases_like_the_trainer(tmp_path):
    payloads, text, proc = run_script(tmp_path, """
        import sys, time
        from orchestrator.runtime import report
        print("before", flush=True)
        with report.phase("load model"):
            blob = bytearray(32 * 1024 * 1024)
            blob[::4096] = b"x" * len(blob[::4096])   # touch every page so RSS grows
        for it in range(1, 4):
            time.sleep(0.05)
            report.step(it, loss=1.0 / it, samples=8, tokens=256, total_steps=3, lr=0.5, grad_norm=it)
        report.done()
        print("mlx imported:", "mlx.core" in sys.modules, flush=True)
    """, rank=1)
    assert proc.returncode == 0, proc.stderr
    assert text == ["before", "mlx imported: False"]  # the reporter never imports MLX
    for p in payloads:
        assert event_validation.validate(p) is not None, p
        assert p["rank"] == 1
    kinds = [p["kind"] for p in payloads]
    assert kinds == ["phase_start", "phase", "train_start", "step", "metric", "step", "metric", "step", "metric",
                     "finished"]
    assert payloads[0]["name"] == "load model"  # the phase's start: the cadence watchdog waits for its end

    phase, start = payloads[1], payloads[2]
    assert phase["name"] == "load model" and phase["ok"] is True and phase["duration_s"] >= 0
    assert phase["rss_after_bytes"] - phase["rss_before_bytes"] >= 16 * 1024 * 1024
    assert phase["rss_peak_bytes"] >= phase["rss_after_bytes"]
    assert phase["mlx_active_before_bytes"] is None and phase["mlx_peak_bytes"] is None
    assert start == {**start, "step": 0, "total_steps": 3}

    steps = [p for p in payloads if p["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["loss"] for s in steps] == [1.0, 0.5, 1.0 / 3]
    assert all(s["total_steps"] == 3 and s["epoch"] == 0 for s in steps)
    # No clock before the first call: its rates are unknown, not invented.
    assert steps[0]["step_time_s"] == 0.0 and steps[0]["samples_per_s"] == 0.0 and steps[0]["tokens_per_s"] is None
    for s in steps[1:]:
        assert s["step_time_s"] >= 0.04  # slept 0.05 s between calls (a lower bound holds under any load)
        assert s["samples_per_s"] == pytest.approx(8 / s["step_time_s"])
        assert s["tokens_per_s"] == pytest.approx(256 / s["step_time_s"])
    metrics = [p for p in payloads if p["kind"] == "metric"]
    assert [m["values"] for m in metrics] == [{"lr": 0.5, "grad_norm": float(i)} for i in (1, 2, 3)]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert payloads[-1]["step"] == 3


def test_a_failing_phase_is_reported_and_the_error_propagates(tmp_path):
    payloads, text, proc = run_script(tmp_path, """
        from orchestrator.runtime import report
        try:
            with report.phase("tokenize"):
                raise KeyError("vocab")
        except KeyError:
            print("caught", flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    assert text == ["caught"]
    assert [(p["kind"], p["name"], p.get("ok")) for p in payloads] == [("phase_start", "tokenize", None),
                                                                       ("phase", "tokenize", False)]
    assert all(event_validation.validate(p) is not None for p in payloads)


@pytest.mark.slow
def test_a_phase_reads_mlx_memory_when_the_program_uses_mlx(tmp_path):
    payloads, _, proc = run_script(tmp_path, """
        import mlx.core as mx
        from orchestrator.runtime import report
        with report.phase("alloc"):
            a = mx.ones((1024, 1024))
            mx.eval(a)
    """)
    assert proc.returncode == 0, proc.stderr
    start, phase = payloads
    assert (start["kind"], phase["kind"]) == ("phase_start", "phase")
    assert event_validation.validate(phase) is not None
    assert phase["mlx_active_after_bytes"] - phase["mlx_active_before_bytes"] >= 4 * 1024 * 1024
    assert phase["mlx_peak_bytes"] >= phase["mlx_active_after_bytes"]


def test_outside_orch_everything_is_a_no_op_and_arguments_are_not_touched(tmp_path):
    payloads, text, proc = run_script(tmp_path, """
        from orchestrator.runtime import report
        class Lazy:  # like an unevaluated mx.array: converting it would force work
            def __float__(self):
                raise RuntimeError("the loss was evaluated outside orch")
        report.start(total_steps=2)
        with report.phase("load"):
            pass
        report.step(1, loss=Lazy(), tokens=Lazy(), lr=Lazy())
        report.done()
        print("ok", flush=True)
    """, events=False)
    assert proc.returncode == 0, proc.stderr
    assert payloads == [] and text == ["ok"]
    assert "\x1e" not in proc.stdout


# -- in-process arithmetic, with a fake clock ---------------------------------

@pytest.fixture
def fresh(monkeypatch):
    """A freshly loaded report module whose events and clock are ours."""
    from orchestrator.runtime import events, report

    monkeypatch.setenv("ORCH_EVENTS", "1")
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(events, "emit", lambda kind, **fields: sent.append((kind, fields)))
    mod = importlib.reload(report)
    clock = [100.0]
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    yield mod, sent, clock
    importlib.reload(report)


def test_rates_are_spread_over_the_steps_between_reports(fresh, monkeypatch):
    report, sent, clock = fresh
    report.start(step=100, total_steps=200)  # resuming at step 100
    clock[0] += 5.0
    report.step(110, loss=2.0, samples=4, tokens=40)
    clock[0] += 2.0
    report.step(120, loss=1.5, samples=4, tokens=40)
    assert sent[0] == ("train_start", {"step": 100, "total_steps": 200})
    first, second = sent[1][1], sent[2][1]
    assert first["step_time_s"] == pytest.approx(0.5) and first["samples_per_s"] == pytest.approx(8.0)
    assert first["tokens_per_s"] == pytest.approx(80.0) and first["total_steps"] == 200
    assert second["step_time_s"] == pytest.approx(0.2) and second["samples_per_s"] == pytest.approx(20.0)
    assert [k for k, _ in sent] == ["train_start", "step", "step"]  # no metrics given: no metric event


def test_a_repeated_step_counts_as_one_step_and_start_is_sent_once(fresh):
    report, sent, clock = fresh
    report.step(7, loss=1.0)
    clock[0] += 3.0
    report.step(7, loss=1.0, samples=6)  # e.g. a restarted loop reporting the same step again
    assert [k for k, _ in sent] == ["train_start", "step", "step"]
    assert sent[0][1] == {"step": 6, "total_steps": None}
    assert sent[2][1]["step_time_s"] == pytest.approx(3.0) and sent[2][1]["samples_per_s"] == pytest.approx(2.0)


@pytest.mark.parametrize("call, message", [
    (lambda r: r.step("ten", loss=1.0), "step must be an integer"),
    (lambda r: r.step(1.5, loss=1.0), "step must be an integer"),
    (lambda r: r.step(1, loss="low"), "loss must be a number"),
    (lambda r: r.step(1, loss=1.0, acc=[1, 2]), "acc must be a number"),
    (lambda r: r.step(True, loss=1.0), "step must be an integer"),
])
def test_bad_arguments_name_the_argument(fresh, call, message):
    report, sent, _ = fresh
    with pytest.raises(TypeError, match=message):
        call(report)
    assert sent == []
