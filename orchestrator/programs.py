"""Progress from programs that are not ours: mlx-lm's report lines as orch events.

Most people who train on a stack of Macs run ``mlx_lm.lora``, not an orch
recipe. It sends no events, but it prints a report per ``--steps-per-report``
iterations; reading those lines gives the live view, ``summary.json`` and the
hang watchdog what a recipe would have sent, with no change to mlx-lm.

What mlx-lm prints (rank 0 only; ``rprint`` / ``TrainUI`` skip other ranks):

* 0.32 (``mlx_lm/cli_ui.py``, ``TrainUI``), through rich with colour forced
  even into a pipe, so every line is read through :func:`strip_ansi` first::

      ╭─ mlx_lm.lora ──...─╮
      │    batch · iters   2 · 12    │          <- batch size and total iterations
      ╰──...──╯
        iter   train_loss     tok/s     tokens  <- TrainUI.__enter__ (the loop starts)
           1    val 4.448    0.04s              <- report_val(it, val_loss, val_time)
           2    4.301 ▼      210      0.0k      <- report_train(it, loss, tokens/s, trained/1000)
        save  0000005_adapters.safetensors      <- report_save(checkpoint)
      train ██████████████████████████████ 100% ·    12/12   <- the progress bar, once, at the end

  The table rows are only believed after the header line: a program that
  prints something merely shaped like a row is not mistaken for mlx-lm.
* Before 0.32 (``mlx_lm/tuner/trainer.py``), plain ``print``::

      Starting training..., iters: 600
      Iter 10: Train loss 2.345, Learning Rate 1.000e-05, It/sec 1.234, Tokens/sec 123.456, Trained Tokens 1234, Peak mem 1.234 GB
      Iter 10: Val loss 2.345, Val took 1.234s
      Iter 100: Saved adapter weights to adapters/adapters.safetensors and adapters/0000100_adapters.safetensors.
      Saved final weights to adapters/adapters.safetensors.

  (mlx-examples' older ``lora.py`` printed the train line without the
  learning rate, trained tokens and peak memory; those parts are optional.)
* Both: ``Test loss 2.345, Test ppl 10.432.`` after ``--test``.

Every pattern matches a whole line, field by field, in the order mlx-lm
prints it; anything else is left alone. The events are the protocol's field
dicts without ``rank``/``t`` (the supervisor adds those), so they go through
the same validation and handling as events a rank sends itself.
"""

from __future__ import annotations

import re
import time
from typing import Optional

__all__ = ["ProgramOutput", "strip_ansi"]

# ECMA-48 escape sequences: CSI (colours, cursor moves), OSC (titles, hyperlinks:
# rich writes those for links), and the other two-byte escapes (ESC 7 / ESC 8
# save and restore the cursor, ESC M...), all but the "[" and "]" openers above.
_ANSI_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[0-Z\\^_]"
)


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colour, cursor movement, links)."""
    if "\x1b" not in text:
        return text
    return _ANSI_RE.sub("", text)


# -- line shapes -------------------------------------------------------------

_NUM = r"(?:\d+\.\d+|nan|inf)"                     # "{:.Nf}" of a non-negative value
_LOSS3 = r"-?(?:\d+\.\d{3}|nan|inf)"               # "{:.3f}"
_GROUPED = r"(?:\d{1,3}(?:,\d{3})*|nan|inf)"       # "{:,.0f}"
_SCI = r"-?(?:\d\.\d{3}e[+-]\d{2,3}|nan|inf)"     # "{:.3e}"

# 0.32 (rich). Spacing is what the format strings give: at least 2/4 spaces, more for padding.
_HEADER = re.compile(r"^ {2}iter {3}train_loss {5}tok/s {5}tokens\s*$")
_TRAIN_ROW = re.compile(
    rf"^ {{2,}}(?P<it>\d+) {{4,}}(?P<loss>{_LOSS3}) [▼▲] {{4,}}(?P<tps>{_GROUPED}) {{4,}}(?P<ktok>\d+\.\d|nan|inf)k\s*$"
)
_VAL_ROW = re.compile(rf"^ {{2,}}(?P<it>\d+) {{4}}val +(?P<loss>{_LOSS3}) {{4}}(?P<secs>\d+\.\d{{2}})s\s*$")
_SAVE_ROW = re.compile(r"^ {2}save {2}(?P<name>(?P<it>\d{7,})_adapters\.safetensors)\s*$")
_PANEL_BATCH = re.compile(r"^│ +batch · iters {3}(?P<batch>\d+) · (?P<iters>\d{1,3}(?:,\d{3})*) +│\s*$")
_DONE_BAR = re.compile(r"^train [█▏▎▍▌▋▊▉░]+ 100% · +(?P<it>\d{1,3}(?:,\d{3})*)/(?P<total>\d{1,3}(?:,\d{3})*)\s*$")

# Before 0.32 (plain print).
_OLD_START = re.compile(r"^Starting training\.\.\., iters: (?P<iters>\d+)\s*$")
_OLD_TRAIN = re.compile(
    rf"^Iter (?P<it>\d+): Train loss (?P<loss>{_LOSS3}),"
    rf"(?: Learning Rate (?P<lr>{_SCI}),)?"
    rf" It/sec (?P<its>{_NUM}), Tokens/sec (?P<tps>{_NUM})"
    rf"(?:, Trained Tokens (?P<tokens>\d+))?"
    rf"(?:, Peak mem (?P<mem>{_NUM}) GB)?\s*$"
)
_OLD_VAL = re.compile(rf"^Iter (?P<it>\d+): Val loss (?P<loss>{_LOSS3}), Val took (?P<secs>{_NUM})s\s*$")
_OLD_SAVE = re.compile(r"^Iter (?P<it>\d+): Saved adapter weights to \S.* and (?P<path>\S.*_adapters\.safetensors)\.\s*$")
_OLD_DONE = re.compile(r"^Saved final weights to \S.*\.\s*$")

_TEST = re.compile(rf"^Test loss (?P<loss>{_LOSS3}), Test ppl (?P<ppl>{_NUM})\.\s*$")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _float(text: str) -> float:
    return float(text.replace(",", ""))


class ProgramOutput:
    """Reads one rank's output lines and returns the events they stand for.

    One instance per rank and attempt. ``feed(line)`` takes a line as the rank
    printed it (ANSI codes and all) and returns a list of event field dicts
    (usually empty). It keeps what it has learnt from earlier lines: whether
    the mlx-lm table header was seen (rows count only after it), the batch
    size and total iterations from the header panel, and the clock of the
    previous report, from which step time and samples/s are measured (mlx-lm
    prints tokens/s but neither of those). Validation time that mlx-lm reports
    between two train rows is taken out of the step time.

    A rank that sends protocol events of its own (an orch recipe, or a program
    using ``orchestrator.runtime.report``) is its own witness: after
    :meth:`note_event` sees its ``train_start`` or ``step``, lines are no longer
    parsed, so nothing is counted twice.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self.active = True
        self.table = False           # the 0.32 table header was seen
        self.started = False         # a train_start was returned
        self.batch_size: Optional[int] = None
        self.total_steps: Optional[int] = None
        self.step: Optional[int] = None
        self._mark_t: Optional[float] = None   # clock at the previous train report (or loop start)
        self._mark_it = 0
        self._val_s = 0.0                      # validation seconds reported since the mark

    def note_event(self, payload: dict) -> None:
        """Tell the parser about an event the rank sent itself."""
        if payload.get("kind") in ("train_start", "step"):
            self.active = False

    def feed(self, line: str, now: Optional[float] = None) -> list[dict]:
        if not self.active:
            return []
        text = strip_ansi(line).rstrip("\r\n")
        if not text.strip():
            return []
        now = self._clock() if now is None else now
        try:
            return self._parse(text, now)
        except (ValueError, OverflowError):  # e.g. an absurdly long digit string: not a report line
            return []

    # -- internals -----------------------------------------------------------

    def _start(self, now: float, total: Optional[int] = None) -> list[dict]:
        if total is not None:
            self.total_steps = total
        self._mark_t, self._mark_it, self._val_s = now, self.step or 0, 0.0
        if self.started:
            return []
        self.started = True
        return [{"kind": "train_start", "step": self.step or 0, "total_steps": self.total_steps}]

    def _step(self, now: float, it: int, loss: float, tokens_per_s: Optional[float],
              step_time: Optional[float] = None) -> list[dict]:
        out = [] if self.started else self._start(now)
        if step_time is None and self._mark_t is not None and it > self._mark_it:
            step_time = max(now - self._mark_t - self._val_s, 0.0) / (it - self._mark_it)
        step_time = step_time or 0.0
        samples_per_s = self.batch_size / step_time if self.batch_size and step_time > 0 else 0.0
        self.step = it
        self._mark_t, self._mark_it, self._val_s = now, it, 0.0
        out.append({
            "kind": "step", "step": it, "epoch": 0, "loss": loss, "samples_per_s": samples_per_s,
            "tokens_per_s": tokens_per_s, "step_time_s": step_time, "total_steps": self.total_steps,
        })
        return out

    def _metric(self, it: Optional[int], values: dict) -> list[dict]:
        return [{"kind": "metric", "step": (self.step or 0) if it is None else it, "values": values}]

    def _finished(self, it: Optional[int]) -> list[dict]:
        return [{"kind": "finished", "step": (self.step or 0) if it is None else it}]

    def _parse(self, text: str, now: float) -> list[dict]:
        if not self.table:
            m = _PANEL_BATCH.match(text)
            if m:
                self.batch_size, self.total_steps = _int(m["batch"]), _int(m["iters"])
                return []
            if _HEADER.match(text):
                self.table = True
                return self._start(now)
        else:
            m = _TRAIN_ROW.match(text)
            if m:
                return self._step(now, _int(m["it"]), _float(m["loss"]), _float(m["tps"]))
            m = _VAL_ROW.match(text)
            if m:
                secs = _float(m["secs"])
                self._val_s += secs
                return self._metric(_int(m["it"]), {"val_loss": _float(m["loss"]), "val_time_s": secs})
            m = _SAVE_ROW.match(text)
            if m:
                return [{"kind": "checkpoint", "step": _int(m["it"]), "path": m["name"]}]
            m = _DONE_BAR.match(text)
            if m:
                return self._finished(_int(m["it"]))
        if text.startswith(("Iter ", "Starting training", "Saved final", "Test loss")):
            return self._parse_plain(text, now)
        return []

    def _parse_plain(self, text: str, now: float) -> list[dict]:
        m = _OLD_TRAIN.match(text)
        if m:
            its = _float(m["its"])
            out = self._step(now, _int(m["it"]), _float(m["loss"]), _float(m["tps"]),
                             step_time=1.0 / its if its > 0 else None)
            extra = {}
            if m["lr"] is not None:
                extra["learning_rate"] = _float(m["lr"])
            if m["mem"] is not None:
                extra["peak_memory_bytes"] = round(_float(m["mem"]) * 1e9)
            if m["tokens"] is not None:
                extra["trained_tokens"] = _int(m["tokens"])
            return out + (self._metric(self.step, extra) if extra else [])
        m = _OLD_VAL.match(text)
        if m:
            secs = _float(m["secs"])
            self._val_s += secs
            return self._metric(_int(m["it"]), {"val_loss": _float(m["loss"]), "val_time_s": secs})
        m = _OLD_START.match(text)
        if m:
            return self._start(now, _int(m["iters"]))
        m = _OLD_SAVE.match(text)
        if m:
            return [{"kind": "checkpoint", "step": _int(m["it"]), "path": m["path"]}]
        if _OLD_DONE.match(text):
            return self._finished(None)
        m = _TEST.match(text)
        if m:
            return self._metric(None, {"test_loss": _float(m["loss"]), "test_ppl": _float(m["ppl"])})
        return []


_THREAD_HEAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-fA-F]+ \(most recent call first\):\s*$")
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)\s*$')


def top_frames(lines: list[str], mark: str, depth: int = 2) -> Optional[str]:
    """Where a rank is, from the ``faulthandler`` dump that follows the last ``mark`` in its output.

    ``"_average at trainer.py:255 (from step at trainer.py:300)"``. faulthandler
    lists threads newest first, so the main thread, where a training loop waits
    in a collective, is the last block. None when there is no dump (a stopped
    rank cannot answer; a program that is not Python has no stacks).
    """
    try:
        start = len(lines) - 1 - lines[::-1].index(mark)
    except ValueError:
        return None
    blocks: list[list[tuple[str, str, str]]] = []
    for line in lines[start + 1:]:
        if _THREAD_HEAD.match(line):
            blocks.append([])
            continue
        m = _FRAME.match(line)
        if m and blocks:
            blocks[-1].append((m["func"], m["file"].rsplit("/", 1)[-1], m["line"]))
    frames = next((b for b in reversed(blocks) if b), None)
    if not frames:
        return None
    here = [f"{func} at {file}:{line}" for func, file, line in frames[:depth]]
    return here[0] + (f" (from {', '.join(here[1:])})" if len(here) > 1 else "")
