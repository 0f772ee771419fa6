"""One attempt of a run: specs -> launcher -> supervise -> collect, and what it ended as.

Everything an attempt starts, it also ends: the launcher is closed whatever happens,
and results come home (SSH) before it is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from orchestrator.aio import handled_cancellation
from orchestrator.launch.base import Launcher, LaunchError, RankSpec
from orchestrator.plan import JobPlan, write_files
from orchestrator.plan.environment import rank_environment
from orchestrator.rundir import PLAN, RankSummary, RunSummary
from orchestrator.run.resolve import Job, make_launcher
from orchestrator.run.request import RunRequest
from orchestrator.stdin_relay import StdinRelay, stdin_ranks

if TYPE_CHECKING:
    from orchestrator.supervisor import Supervisor


@dataclass
class Resume:
    """How an attempt continues an earlier one: the program's arguments, and what the summary says."""

    script_args: list[str]
    resumed: bool = False
    note: Optional[str] = None
    file: Optional[str] = None  # --resume-arg: the local file each host gets a copy of
    words: Optional[list[str]] = None  # --resume-arg: its words, {latest} still in them


def build_specs(job: Job, plan: JobPlan, req: RunRequest) -> list[RankSpec]:
    """Per rank: what to run, and its environment (``plan/environment.py``)."""
    paths = write_files(plan, job.rundir.path)  # mlx-hostfile.json / mlx-ibv-devices.json, as mlx.launch writes them
    files = plan.files()
    readers = stdin_ranks(req.stdin, plan.world_size)
    specs = []
    for r in plan.ranks:
        host = job.hostfile.hosts[r.host_index]
        env = rank_environment(job.hostfile, plan, r, paths, user_env=req.env, run_dir=str(job.rundir.path),
                               run_id=job.rundir.run_id, grace=req.grace, bind=req.bind, reads_stdin=r.rank in readers)
        specs.append(RankSpec(
            rank=r.rank, host=r.host, host_index=r.host_index, script=job.script, program=req.program,
            script_args=list(req.script_args), python=req.python or host.python, env=env, cwd=req.cwd or host.cwd,
            mlx_hostfile_json=files.get("MLX_HOSTFILE"),
        ))
    return specs


async def run_attempt(job: Job, plan: JobPlan, attempt: int, resume: Resume,
                      stdin_relay: Optional[StdinRelay]) -> RunSummary:
    """Start every rank of ``plan``, supervise them to the end, bring results home; the attempt's summary."""
    req = job.req.model_copy(update={"script_args": resume.script_args})
    launcher = make_launcher(job, plan, req)
    specs = build_specs(job, plan, req)
    if resume.file is not None:
        for spec in specs:
            spec.resume_words, spec.resume_file = resume.words, resume.file
    started = time.monotonic()
    try:
        await launcher.prepare(specs)
    except LaunchError as e:
        await launcher.aclose()
        _write_plan(job, plan)
        return failed_before_start(job, plan, str(e))
    except asyncio.CancelledError:  # Ctrl-C while connecting or staging: asyncio.run cancels us once
        handled_cancellation()
        await _close_quietly(launcher)
        _write_plan(job, plan)
        return interrupted_before_start(job, plan, time.monotonic() - started)
    try:  # whatever fails from here on, the launcher is closed (configured local ranks stop)
        _write_plan(job, plan)
        sup = _supervisor(job, plan, specs, launcher, req, attempt, stdin_relay, started)
        try:  # a Ctrl-C since the run began that is not yet delivered (a local prepare never waits) lands
            await asyncio.sleep(0)  # here, before the supervisor takes the signals over, not inside it
        except asyncio.CancelledError:
            handled_cancellation()
            return interrupted_before_start(job, plan, time.monotonic() - started,
                                            "interrupted while starting: the ranks were stopped as they started")
        return await sup.run()
    finally:
        await launcher.collect(job.rundir.path)  # results home (SSH), whatever the outcome
        await launcher.aclose()


def _write_plan(job: Job, plan: JobPlan) -> None:
    """plan.json, written after prepare: pre-started local ranks get their configuration first (dumping the
    plan builds its model)."""
    job.rundir.write_json(PLAN, plan.model_dump(mode="json"))


def _supervisor(job: Job, plan: JobPlan, specs: list[RankSpec], launcher: Launcher, req: RunRequest, attempt: int,
                stdin_relay: Optional[StdinRelay], started: float) -> "Supervisor":
    """The attempt's supervisor, its module loaded only now: pre-started local ranks got their
    configuration in ``prepare`` and run their program while the supervisor's ~20 modules load."""
    from orchestrator.supervisor import Supervisor, SupervisorOptions

    return Supervisor(plan, specs, launcher, job.rundir, job.script, out=job.sink.out, err=job.sink.err,
                      options=SupervisorOptions(
        init_timeout=req.init_timeout, echo=req.echo, hang_timeout=req.hang_timeout,
        hang_floor=req.hang_floor, first_step_timeout=req.first_step_timeout, attempt=attempt,
        # The guard SIGKILLs a rank that ignores SIGTERM after --grace; the controller's own
        # last resort comes only after that (a JACCL survivor spinning must get the full grace).
        stop_timeout=max(3.0, req.grace + 2.0),
        stdin_relay=stdin_relay, stdin_ranks=stdin_ranks(req.stdin, plan.world_size),
        # A rank waiting for typed input prints nothing and uses no CPU: not a hang.
        idle_watchdog=req.stdin == "none", started=started))


async def _close_quietly(launcher, timeout: float = 10.0) -> None:
    """Close what prepare opened (over SSH: the sessions end at their ``read``, the hosts' run directories
    are retired), bounded: a second Ctrl-C, or a host that stopped answering, does not hold the exit."""
    try:
        await asyncio.wait_for(launcher.aclose(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError, OSError):
        pass


def interrupted_before_start(job: Job, plan: JobPlan, duration: float,
                             reason: str = "interrupted while starting (connecting, staging): no rank ran") -> RunSummary:
    """Ctrl-C before the supervisor took over: say so, exit 130."""
    job.say(reason)
    return RunSummary(
        status="interrupted", exit_code=130, failed_rank=None, reason=reason, duration_s=round(duration, 3),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), script=job.script, backend=plan.backend,
        world_size=plan.world_size, run_dir=str(job.rundir.path),
        ranks=[RankSummary(rank=r.rank, host=r.host) for r in plan.ranks],
    )


def failed_before_start(job: Job, plan: JobPlan, reason: str) -> RunSummary:
    """Nothing started: say why, exit 1."""
    job.say(f"could not start the run: {reason}")
    return RunSummary(
        status="failed", exit_code=1, failed_rank=None, reason=reason, duration_s=0.0,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), script=job.script, backend=plan.backend,
        world_size=plan.world_size, run_dir=str(job.rundir.path),
        ranks=[RankSummary(rank=r.rank, host=r.host) for r in plan.ranks],
    )
