"""The run, top to bottom: resolve the request into a ``Job``, order the ring if asked, then
attempts until one ends or the restart policy gives up; the summary is written last.

    resolve (run/resolve.py) -> stage_inputs (run/stage_inputs.py: --stage-to) -> order_ring
        (run/ring_order.py) -> run_attempt (run/attempt.py)
        -> restart policy (run/restart.py) -> ... -> summary.json
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Optional

from orchestrator.rundir import SUMMARY, AttemptSummary, RunSummary
from orchestrator.run import restart
from orchestrator.run.attempt import run_attempt
from orchestrator.run.request import RunRequest
from orchestrator.run.resolve import Job, resolve
from orchestrator.run.ring_order import order_ring
from orchestrator.run.stage_inputs import stage_inputs
from orchestrator.stdin_relay import StdinRelay


def run_job(req: RunRequest) -> RunSummary:
    """Bad input (hostfile, values, a busy or impossible run directory) raises ``ConfigError`` before anything starts."""
    return asyncio.run(run_job_async(req))


async def run_job_async(req: RunRequest) -> RunSummary:
    """Run the job; with --max-restarts, start it again from the last checkpoint after a failure."""
    job = resolve(req)
    try:
        if req.stage_to:
            failed = await stage_inputs(job)
            if failed is not None:
                return _last_line(job, failed)
        if req.ring_order == "measured":
            ordered = await order_ring(job)
            if isinstance(ordered, RunSummary):  # could not measure: the run failed before it started
                return _last_line(job, ordered)
            job = ordered
        return _last_line(job, await _attempts(job))
    finally:
        job.rundir.close()  # also releases the run directory's lock when interrupted


async def _attempts(job: Job) -> RunSummary:
    req, t0 = job.req, time.monotonic()
    policy = restart.Policy(job)
    attempts: list[AttemptSummary] = []
    stdin_relay = StdinRelay() if req.stdin != "none" else None  # one reader of orch's stdin for every attempt
    plan = job.plan
    summary: Optional[RunSummary] = None
    for attempt in range(req.max_restarts + 1):
        if attempt > 0:
            plan = policy.next_plan()
            job.rundir.start_attempt(attempt)
        resume = restart.resume_for(job, attempt)
        summary = await run_attempt(job, plan, attempt, resume, stdin_relay)
        attempts.append(_attempt_summary(attempt, attempts, summary, resume, plan.backend))
        if summary.status != "failed" or attempt == req.max_restarts:
            break
        job, notes = policy.after_failure(attempt, summary, plan)
        if notes:
            attempts[-1].note = "; ".join(n for n in [attempts[-1].note, *notes] if n)
        delay = policy.delay(attempt)
        sys.stderr.write(f"orch: restart {attempt + 1}/{req.max_restarts} in {delay:g}s"
                         f"{' from the latest checkpoint' if job.rundir.latest_checkpoint.exists() else ''}\n")
        if not await restart.backoff(delay):
            summary = summary.model_copy(update={"status": "interrupted", "exit_code": 130})
            break
    return _finish(job, summary, attempts, t0)


def _attempt_summary(attempt: int, earlier: list[AttemptSummary], summary: RunSummary, resume: restart.Resume,
                     backend: str) -> AttemptSummary:
    cause = (earlier[-1].diagnosis or earlier[-1].reason) if earlier else None
    return AttemptSummary(
        attempt=attempt, cause=cause, status=summary.status, exit_code=summary.exit_code,
        failed_rank=summary.failed_rank, reason=summary.reason, diagnosis=summary.diagnosis,
        started_at=summary.started_at, duration_s=summary.duration_s, note=resume.note, resumed=resume.resumed,
        backend=backend, diagnosis_cause=summary.diagnosis_cause)


def _finish(job: Job, summary: RunSummary, attempts: list[AttemptSummary], t0: float) -> RunSummary:
    """The run's summary, with its attempts, written last (a full disk is one line; the exit code still tells)."""
    req = job.req
    summary = summary.model_copy(update={
        "attempts": attempts if req.max_restarts or req.resume else [], "restarts": len(attempts) - 1,
        "duration_s": round(time.monotonic() - t0, 3)})
    try:
        job.rundir.write_summary(summary)
    except OSError as e:
        job.say(f"could not write {job.rundir.path / SUMMARY}: {e.strerror or e}")
    job.rundir.close()
    return summary


def _last_line(job: Job, summary: RunSummary) -> RunSummary:
    """The run's outcome over all its attempts, and where it is: the last line, said once per run."""
    tries = f" after {summary.restarts + 1} attempts" if summary.restarts else ""
    job.say(f"{summary.status}{tries} in {summary.duration_s:.2f}s; run directory {summary.run_dir}")
    return summary
