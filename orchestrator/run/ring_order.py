"""``--ring-order measured``: the stage before the first attempt that puts the hosts in the fastest ring."""

from __future__ import annotations

from orchestrator.hostfile import ConfigError
from orchestrator.plan import plan_job
from orchestrator.rundir import RunSummary
from orchestrator.run.attempt import failed_before_start
from orchestrator.run.resolve import Job


async def order_ring(job: Job) -> "Job | RunSummary":
    """--ring-order measured: measure every link between the hosts, put them in the order of the fastest ring.

    The ring all_sum runs at the speed of the ring's slowest link, so the order that maximises it is
    chosen (``ringorder.py``) and the hostfile re-planned in that order; the choice, the bottleneck
    and the whole link matrix go into plan.json. Hosts that cannot be reached, or no ring over
    working links, fail the run before anything starts (exit 1), as an unreachable host does.
    """
    from orchestrator.probe.linkbw import measure_hostfile, needs_measuring
    from orchestrator.plan.ringorder import NoRingError, apply_order, choose_ring

    req, hostfile, plan = job.req, job.hostfile, job.plan
    why_not = needs_measuring(hostfile)
    if why_not:
        job.say(f"--ring-order measured: nothing to choose ({why_not}); keeping the hostfile's order")
        return job
    try:
        from orchestrator.remote.ssh import SSHOptions

        matrix = await measure_hostfile(hostfile, SSHOptions.from_args(req), python=req.python,
                                        timeout=max(5.0, min(req.connect_timeout, 30.0)))
        choice = choose_ring(matrix)
    except (ConfigError, NoRingError) as e:
        summary = failed_before_start(job, plan, f"--ring-order measured: {e}")
        job.rundir.write_summary(summary)
        return summary
    job.say(f"{choice.words()} (links measured in {matrix.seconds:.1f}s)")
    ordered = apply_order(hostfile, choice)
    new_plan = plan_job(ordered, plan.backend, req.connections_per_ip, req.starting_port)
    return job.with_(hostfile=ordered, plan=new_plan.model_copy(update={"ring_order": choice.model_dump(mode="json")}))
