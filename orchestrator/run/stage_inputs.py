"""``orch run --stage-to SRC:DEST``: ``orch stage`` as the first stage of a run, before any rank starts.

The files go to every host of the run (its hostfile, in ring order, over the same SSH options),
host to host along the ring (``orchestrator/stage/``); a stage that does not reach every host
fails the run before anything starts, naming the hosts, as an unreachable host does.
"""

from __future__ import annotations

from typing import Optional

from orchestrator.rundir import RunSummary
from orchestrator.run.attempt import failed_before_start
from orchestrator.run.request import stage_pair
from orchestrator.run.resolve import Job


async def stage_inputs(job: Job) -> Optional[RunSummary]:
    """Stage every ``--stage-to`` pair; None when all reached every host, else the run's failed summary."""
    from orchestrator.remote.ssh import SSHOptions
    from orchestrator.stage.chain import StageRequest, run_stage
    from orchestrator.stage.source import SourceError, walk_source

    for pair in job.req.stage_to:
        src, dest = stage_pair(pair)
        try:
            source = walk_source(src)
            summary = await run_stage(StageRequest(src=src, dest=dest, hostfile=job.hostfile,
                                                   ssh=SSHOptions.from_args(job.req), python=job.req.python),
                                      source, job.sink.err, progress=False)
        except SourceError as e:
            return _failed(job, f"--stage-to {pair}: {e}")
        missing = [h.host for h in summary.hosts if h.status != "ok"]
        if summary.exit_code or missing:
            return _failed(job, f"--stage-to {pair}: not every host got the files ({', '.join(missing) or summary.status})")
        moved = sum(h.bytes_written for h in summary.hosts)
        job.say(f"--stage-to: {summary.files} files -> {dest} on {len(summary.hosts)} hosts in {summary.wall_s:.2f}s "
                f"({moved / 1e6:.1f} MB written, {summary.sent_by_controller / 1e6:.1f} MB left this machine)")
    return None


def _failed(job: Job, reason: str) -> RunSummary:
    summary = failed_before_start(job, job.plan, reason)
    job.rundir.write_summary(summary)
    return summary
