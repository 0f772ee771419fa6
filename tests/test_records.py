"""One fold of events into per-rank state (records.py), the job's phases, and the task group (aio.py)."""

import asyncio

import pytest

from orchestrator.aio import TaskGroup
from orchestrator.launch.base import RankSpec
from orchestrator.plan import JobPlan
from orchestrator.records import RankPhase, RankRecord, fold
from orchestrator.report.data import summary_from_events
from orchestrator.rundir import RunDir
from orchestrator.supervisor import JobPhase, Supervisor


def ev(kind, rank=0, **kw):
    return {"kind": kind, "rank": rank, "t": 100.0, **kw}


def test_a_rank_record_folds_steps_memory_and_the_guards_samples():
    r = RankRecord(rank=1, host="mac1")
    r.apply(ev("step", 1, step=3, total_steps=10, loss=0.5, samples_per_s=99.0))
    r.apply(ev("memory", 1, mlx_peak_bytes=500, mlx_active_bytes=100, mlx_cache_bytes=7, rss_bytes=1000,
               system_available_bytes=9000))
    r.apply(ev("rss", 1, rss_bytes=4000, system_available_bytes=8000, cpu_s=1.5, stopped=False))
    r.apply(ev("memory", 1, mlx_peak_bytes=300, mlx_active_bytes=50, mlx_cache_bytes=0, rss_bytes=2000,
               system_available_bytes=9500))
    r.apply(ev("rebalance", 1, step=4, reason="calibration", shares=[4, 12]))
    r.apply(ev("phase", 1, name="load", duration_s=0.25, ok=True))
    row = r.summary(exit_code=0).model_dump()
    assert (row["steps"], row["last_loss"], row["samples_per_s"], row["batch_share"]) == (3, 0.5, 99.0, 12)
    m = row["memory"]
    assert (m["mlx_peak_bytes"], m["mlx_active_bytes"], m["rss_peak_bytes"], m["system_available_min_bytes"]) == (
        500, 50, 4000, 8000)
    assert [p["name"] for p in row["phases"]] == ["load"] and row["exit_code"] == 0
    assert r.cpu_s == 1.5 and r.stopped is False and r.phase == RankPhase.TRAINING


def test_a_ranks_phase_only_moves_forward_and_only_the_guards_word_names_a_pid():
    r = RankRecord(rank=0)
    r.apply(ev("finished"))
    r.apply(ev("init_start"))
    r.apply(ev("listening", address="a:1"))
    assert r.phase == RankPhase.FINISHED and r.reached(RankPhase.READY)
    r.apply(ev("spawned", pid=4242, host="x", attempt=0), trusted=False)
    assert r.pid is None
    r.apply(ev("spawned", pid=1, host="x", attempt=0))
    assert r.pid is None
    r.apply(ev("spawned", pid=4242, host="x", attempt=0))
    r.apply(ev("spawned", pid=4343, host="x", attempt=0))  # once per attempt
    assert r.pid == 4242
    r.apply(ev("spawned", pid=5151, host="x", attempt=1))  # a restart's own rank
    assert r.pid == 5151


def test_the_guards_exit_word_raises_the_rss_peak_to_the_kernels_count():
    r = RankRecord(rank=0)
    r.apply(ev("rss", rss_bytes=1000, cpu_s=0.1, stopped=False))
    r.apply(ev("exited", code=0, signal=None, max_rss_bytes=5000), trusted=False)
    assert r.memory.rss_peak_bytes == 1000  # a line from the rank that claims to be its guard changes nothing
    r.apply(ev("exited", code=0, signal=None, max_rss_bytes=5000))
    assert r.memory.rss_peak_bytes == 5000
    r.apply(ev("exited", code=0, signal=None, max_rss_bytes=3000))  # a peak never goes down
    assert r.memory.rss_peak_bytes == 5000


def test_a_summary_rebuilt_from_events_is_the_same_fold():
    events = [ev("spawned", 0, pid=77, host="h", recv_t=1.0),
              ev("step", 0, step=5, loss=0.25, samples_per_s=10.0, recv_t=2.0),
              ev("rss", 0, rss_bytes=123456, cpu_s=0.5, recv_t=3.0),
              ev("metric", 0, values={"acc": 0.9}, recv_t=3.5),
              ev("rebalance", 0, step=0, reason="start", shares=[8], recv_t=3.6),
              ev("exited", 0, code=3, signal=None, recv_t=4.0)]
    s = summary_from_events(events, {"ranks": [{"rank": 0, "host": "h"}], "world_size": 1, "backend": "ring"}, "incomplete")
    records, run = fold(events, {0: "h"})
    assert s["ranks"] == [records[0].summary(exit_code=3).model_dump(mode="json")]
    row = s["ranks"][0]
    assert (row["pid"], row["steps"], row["exit_code"], row["memory"]["rss_peak_bytes"]) == (77, 5, 3, 123456)
    assert s["metrics"] == {"acc": 0.9} and s["rebalances"][0]["shares"] == [8] and s["duration_s"] == 3.0


class _NoLauncher:
    name = "local"


def test_the_job_moves_only_along_its_phases(tmp_path):
    plan = JobPlan(backend="ring", world_size=1, ranks=[])
    sup = Supervisor(plan, [RankSpec(rank=0, host="h", script="x.py")], _NoLauncher(), RunDir(tmp_path), "x.py")
    assert sup.phase is JobPhase.STARTING
    with pytest.raises(RuntimeError, match="starting -> done"):
        sup._enter(JobPhase.DONE)
    for p in (JobPhase.RUNNING, JobPhase.SETTLING, JobPhase.STOPPING, JobPhase.DONE):
        sup._enter(p)
    with pytest.raises(RuntimeError):
        sup._enter(JobPhase.RUNNING)


def test_a_failing_task_cancels_its_siblings_and_the_body_and_is_raised():
    ended = []

    async def sibling():
        try:
            await asyncio.sleep(30)
        finally:
            ended.append("sibling")

    async def boom():
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    async def main():
        async with TaskGroup() as g:
            g.create_task(sibling())
            g.create_task(boom())
            try:
                await asyncio.sleep(30)
            finally:
                ended.append("body")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert sorted(ended) == ["body", "sibling"]


def test_drain_waits_a_bounded_time_then_cancels():
    async def main():
        async with TaskGroup() as g:
            quick = g.create_task(asyncio.sleep(0))
            stuck = g.create_task(asyncio.sleep(30))
            await g.drain(0.2)
        return quick, stuck

    quick, stuck = asyncio.run(asyncio.wait_for(main(), 10))
    assert quick.done() and not quick.cancelled() and stuck.cancelled()


def test_run_directory_names_agree_with_the_sides_that_cannot_import_rundir():
    """rundir.py owns the names; the runtime (never imports the controller) and plan.py (on the launch
    path, kept light) spell three of them again: they must agree."""
    from orchestrator import plan, rundir
    from orchestrator.runtime import checkpoint

    assert (rundir.CHECKPOINTS, rundir.LATEST) == (checkpoint.CHECKPOINTS_DIR, checkpoint.MANIFEST)
    assert plan.FILE_NAMES["MLX_HOSTFILE"] == rundir.MLX_HOSTFILE
