"""The restart policy, as one named step between attempts (torch elastic's ``_restart_workers``).

``first_resume`` / ``resume_for`` say how an attempt continues the run (the newest complete
checkpoint with ``--resume``, or ``--resume-from``'s newest file through ``--resume-arg``);
``after_failure`` decides what the next attempt changes (``--fallback-backend``,
``--exclude-failed-host``) and ``backoff`` waits before it, interruptibly.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass, field
from typing import Optional

from orchestrator import backends
from orchestrator.aio import signals_handled_by
from orchestrator.hostfile import Hostfile
from orchestrator.plan import JobPlan
from orchestrator.rundir import RunDir, RunSummary
from orchestrator.run.attempt import Resume
from orchestrator.run.request import newest_match, resume_words
from orchestrator.run.resolve import Job


def resume_for(job: Job, attempt: int) -> Resume:
    """How attempt ``attempt`` starts: afresh, or continuing (a restart, or ``orch run --resume``)."""
    req = job.req
    continuing = attempt > 0 or req.resume
    if continuing and req.resume_arg:
        latest, note = _resume_arg_file(job, attempt)
        return Resume(list(req.script_args), resumed=latest is not None, note=note, file=latest,
                      words=resume_words(req) if latest is not None else None)
    args = _resume_args(req.script_args, job.rundir) if continuing else list(req.script_args)
    note = _checkpoint_note(job.rundir) if "--resume" in args and "--resume" not in req.script_args else None
    if req.resume and not attempt:
        job.say(f"--resume: {note or 'no complete checkpoint in the run directory: starting afresh'}")
    return Resume(args, resumed=continuing and "--resume" in args, note=note)


def _resume_arg_file(job: Job, attempt: int) -> tuple[Optional[str], str]:
    """A restart with --resume-arg: (the local file it resumes from, or None; a note for the summary).

    The launchers add the template's words to the program's arguments (see
    ``RankSpec.resume_words``): locally with this path, over SSH with the copy
    each host gets.
    """
    req = job.req
    latest = newest_match(req.resume_from, job.rundir.path)
    if latest is None:
        note = (f"no file matched --resume-from {req.resume_from} (in {job.rundir.path}): attempt {attempt} started "
                "without --resume-arg")
        job.say(note)
        return None, note
    words = [w.replace("{latest}", latest) for w in resume_words(req)]
    job.say(f"attempt {attempt} resumes from {latest} ({' '.join(map(shlex.quote, words))})")
    return latest, f"resumed from {latest} (--resume-arg)"


def _checkpoint_note(rundir: RunDir) -> Optional[str]:
    """Where a continued attempt resumes: the run directory's newest complete checkpoint (mlx-lm: its iteration)."""
    from orchestrator.runtime import checkpoint

    cp = checkpoint.latest_complete(rundir.checkpoints)
    if cp is None:
        return None
    return f"resumed from {'iteration' if 'mlx_lm' in cp.state else 'step'} {cp.step} ({cp.path})"


def _resume_args(script_args: list[str], rundir: RunDir) -> list[str]:
    """Restarts continue from the latest complete checkpoint when the program wrote one."""
    if "--resume" in script_args or not rundir.latest_checkpoint.exists():
        return list(script_args)
    return [*script_args, "--resume"]


@dataclass
class Policy:
    """What changes between attempts, and the evidence it is decided on."""

    job: Job
    host_failures: dict[str, int] = field(default_factory=dict)
    fell_back: Optional[str] = None  # why the backend changed (--fallback-backend), for plan.json

    def after_failure(self, attempt: int, summary: RunSummary, plan: JobPlan) -> tuple[Job, list[str]]:
        """The job the next attempt runs, and the notes that say what changed."""
        job, notes = self.job, []
        fallback = self._fallback_note(job, summary)
        if fallback:
            job = job.with_(backend=backends.get(job.req.fallback_backend))
            self.fell_back = (f"--fallback-backend {job.backend.name}: JACCL failed to start in attempt {attempt} "
                              f"({summary.diagnosis_cause})")
            notes.append(fallback)
        if job.req.exclude_failed_host and summary.failed_rank is not None:
            hostfile, note = _exclude_twice_failed(job.hostfile, plan, summary.failed_rank, self.host_failures)
            if note:
                job = job.with_(hostfile=hostfile)
                notes.append(note)
        for note in notes:
            job.say(note)
        self.job = job
        return job, notes

    def next_plan(self) -> JobPlan:
        plan = self.job.replan()
        if self.fell_back:
            plan.backend_reason = self.fell_back
        return plan

    @staticmethod
    def _fallback_note(job: Job, summary: RunSummary) -> Optional[str]:
        """--fallback-backend: an attempt that failed while JACCL was coming up restarts on (say) the ring.

        Only failures of the backend's initialisation qualify (RDMA not enabled, a device
        missing, queue pairs that would not connect): a JACCL run that trained and then
        failed restarts on JACCL, as any other run would.
        """
        req = job.req
        if not req.fallback_backend or summary.diagnosis_cause not in job.backend.init_failures:
            return None
        start = "from the latest checkpoint" if job.rundir.latest_checkpoint.exists() else "from the start (no checkpoint yet)"
        return (f"JACCL failed to start ({summary.diagnosis}); restarting on the {req.fallback_backend} backend over the "
                f"same hosts {start}")

    def delay(self, attempt: int) -> float:
        return min(30.0, self.job.req.restart_backoff * 2 ** attempt)


def _exclude_twice_failed(hostfile: Hostfile, plan: JobPlan, failed_rank: int,
                          counts: dict[str, int]) -> tuple[Hostfile, Optional[str]]:
    """--exclude-failed-host: drop a host that was the root cause twice; data parallel runs on with fewer ranks."""
    host = hostfile.hosts[plan.ranks[failed_rank].host_index]
    counts[host.name] = counts.get(host.name, 0) + 1
    if counts[host.name] < 2 or len(hostfile.hosts) < 2:
        return hostfile, None
    kept = [h for h in hostfile.hosts if h is not host]
    before, after = hostfile.world_size, sum(h.slots for h in kept)
    note = (f"excluding host {host.name} (root cause of two failures): world size {before} -> {after}; "
            "the global batch shrinks accordingly and the run resumes from the latest checkpoint")
    return hostfile.model_copy(update={"hosts": kept}), note


async def backoff(seconds: float) -> bool:
    """Sleep before a restart; False if the user interrupted meanwhile."""
    stop = asyncio.Event()
    with signals_handled_by(lambda sig: stop.set()):
        try:
            await asyncio.wait_for(stop.wait(), seconds)
            return False
        except asyncio.TimeoutError:
            return True
