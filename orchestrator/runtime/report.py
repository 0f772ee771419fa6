"""One-line progress reporting for any program that runs under ``orch``.

Most programs people launch are not orch recipes: their own training loop,
mlx-lm, a script from a blog post. One import and one call per step gives
them what the built-in trainer gets (the live view, ``summary.json``, the
hang watchdog, ``orch report``)::

    from orchestrator.runtime import report

    for it in range(1, steps + 1):
        loss = train_step(...)
        report.step(it, loss=loss, samples=batch_size, tokens=n_tokens, total_steps=steps, lr=lr)

    with report.phase("load model"):
        model = load(...)

Why it is built this way:

* It sends the same protocol events as ``trainer.py`` (``train_start`` on the
  first call so the controller's watchdog arms, then ``step``; extra keyword
  metrics go in a ``metric`` event), so the controller needs nothing new.
* Rates come from wall time between calls: the program only says how much
  work one step was (``samples`` / ``tokens`` per step), never how long it took.
* It imports neither the controller nor MLX (only ``orchestrator.protocol``
  through ``events``): a phase reads MLX's memory counters only if the program
  already imported ``mlx.core``, and never forces a computation.
* Outside orch (``ORCH_EVENTS`` unset: plain ``python``, ``mlx.launch``) every
  call returns at once without touching its arguments, so a ``loss`` that is
  an ``mx.array`` is not evaluated just to be reported.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from orchestrator.runtime import events

__all__ = ["done", "phase", "start", "step"]

_lock = threading.Lock()
_started = False
_last_t: Optional[float] = None  # perf_counter of the previous step (or of an explicit start())
_last_step: Optional[int] = None
_total_steps: Optional[int] = None


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"report: {name} must be an integer, not a bool")
    if not isinstance(value, int):  # numpy / MLX integers, 10.0
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"report: {name} must be an integer, not {type(value).__name__}") from None
        if not as_float.is_integer():
            raise TypeError(f"report: {name} must be an integer, not {value!r}")
        return int(as_float)
    return value


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)  # also an mx.array / numpy scalar (``.item()`` under the hood)
    except (TypeError, ValueError):
        raise TypeError(f"report: {name} must be a number, not {type(value).__name__}") from None


def _emit_start(step: int, total_steps: Optional[int]) -> None:
    global _started
    _started = True
    events.emit("train_start", step=step, total_steps=total_steps)


def start(step: int = 0, total_steps: Optional[int] = None) -> None:
    """Say that training begins at ``step`` (optional: the first ``step()`` call does it too).

    Calling it explicitly starts the clock, so the first step's rates are known.
    """
    global _last_t, _last_step, _total_steps
    if not events.enabled():
        return
    step = _as_int("step", step)
    total = None if total_steps is None else _as_int("total_steps", total_steps)
    with _lock:
        _total_steps = total
        _last_t, _last_step = time.perf_counter(), step
        _emit_start(step, total)


def step(
    step: int,
    loss: Any,
    *,
    samples: Optional[float] = None,
    tokens: Optional[float] = None,
    total_steps: Optional[int] = None,
    epoch: int = 0,
    **metrics: Any,
) -> None:
    """Report that ``step`` is done with this ``loss``.

    ``samples`` and ``tokens`` are the work of *one* step (the batch), as in a
    trainer's batch size; samples/s, tokens/s and the step time are measured
    from the wall time since the previous call (divided over the steps between
    the two calls, so reporting every 10th step is fine). The first call's
    rates are 0 unless ``start()`` was called. Any other keyword is a scalar
    metric (``lr=3e-4``, ``grad_norm=...``) sent as a ``metric`` event.
    """
    global _last_t, _last_step, _total_steps
    if not events.enabled():
        return
    now = time.perf_counter()
    step = _as_int("step", step)
    loss_f = _as_float("loss", loss)
    values = {name: _as_float(name, v) for name, v in metrics.items()}
    samples_f = None if samples is None else _as_float("samples", samples)
    tokens_f = None if tokens is None else _as_float("tokens", tokens)
    epoch = _as_int("epoch", epoch)
    with _lock:
        if total_steps is not None:
            _total_steps = _as_int("total_steps", total_steps)
        if not _started:
            _emit_start(max(step - 1, 0), _total_steps)
        step_time = 0.0
        if _last_t is not None:
            elapsed_steps = step - _last_step if _last_step is not None and step > _last_step else 1
            step_time = max(now - _last_t, 0.0) / elapsed_steps
        _last_t, _last_step = now, step
        total = _total_steps

    def rate(work: Optional[float]) -> Optional[float]:
        return work / step_time if work is not None and step_time > 0 else None

    events.emit(
        "step", step=step, epoch=epoch, loss=loss_f,
        samples_per_s=rate(samples_f) or 0.0, tokens_per_s=rate(tokens_f),
        step_time_s=step_time, total_steps=total,
    )
    if values:
        events.emit("metric", step=step, values=values)


def done(step: Optional[int] = None) -> None:
    """Say that training finished (at ``step``, default the last reported one)."""
    if not events.enabled():
        return
    final = _last_step if step is None else _as_int("step", step)
    events.emit("finished", step=final or 0)


# -- phases ---------------------------------------------------------------

def _rss_bytes() -> Optional[int]:
    """This process's resident set size now, from /proc (Linux) or psutil (elsewhere)."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        import psutil  # an orch dependency; cheap next to the phase being measured

        return int(psutil.Process().memory_info().rss)
    except Exception:  # a progress report must never take the program down
        return None


def _rss_peak_bytes() -> Optional[int]:
    """The process's peak RSS (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except Exception:
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _mlx_memory() -> tuple[Optional[int], Optional[int]]:
    """MLX (active, peak) bytes if the program already imported MLX; never imports it."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None, None

    def read(name: str) -> Optional[int]:
        fn = getattr(mx, name, None) or getattr(getattr(mx, "metal", None), name, None)
        try:
            return int(fn()) if fn is not None else None
        except Exception:
            return None

    return read("get_active_memory"), read("get_peak_memory")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase of the program and record memory before and after it.

    Sends a ``phase`` event when the block ends, also when it raises (then
    ``ok`` is false and the exception propagates unchanged).
    """
    if not events.enabled():
        yield
        return
    events.emit("phase_start", name=str(name))  # the controller's cadence watchdog pauses until the phase ends
    rss_before = _rss_bytes()
    active_before, _ = _mlx_memory()
    started = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        duration = time.perf_counter() - started
        active_after, peak = _mlx_memory()
        rss_after = _rss_bytes()
        # ru_maxrss and /proc are counted slightly differently; the peak is never below what we saw.
        seen = [v for v in (_rss_peak_bytes(), rss_before, rss_after) if v is not None]
        events.emit(
            "phase", name=str(name), duration_s=round(duration, 6), ok=ok,
            rss_before_bytes=rss_before, rss_after_bytes=rss_after, rss_peak_bytes=max(seen) if seen else None,
            mlx_active_before_bytes=active_before, mlx_active_after_bytes=active_after, mlx_peak_bytes=peak,
        )
