"""Diagnoses from recorded stderr of real failures (tests/fixtures/stderr/SOURCES.md)."""

from pathlib import Path

import pytest

from orchestrator.diagnose import classify
from orchestrator.hostfile import parse_hostfile
from orchestrator.plan import plan_job

FIX = Path(__file__).parent / "fixtures" / "stderr"


def lines(name):
    return (FIX / name).read_text().split("\n")


def plan3():
    hf = parse_hostfile({"hosts": [{"ssh": f"mac{i}", "ips": [f"10.0.{i}.2"]} for i in range(3)]})
    return plan_job(hf, "ring", starting_port=5000)


def test_couldnt_connect_names_the_neighbour_and_its_address():
    d = classify(lines("ring_couldnt_connect.txt"), rank=1, plan=plan3())
    assert d.cause == "ring_connect" and not d.secondary
    assert "rank 1 could not connect to rank 2 at 10.0.2.2:5002 (host mac2)" in d.message
    assert "connection refused" in d.message


def test_bind_failure_names_the_own_address():
    d = classify(lines("ring_bind_in_use.txt"), rank=0, plan=plan3())
    assert d.cause == "ring_bind" and "10.0.0.2:5000" in d.message and "address already in use" in d.message


def test_peer_lost_is_secondary():
    d = classify(lines("ring_peer_lost.txt"), rank=0)
    assert d.cause == "ring_peer_lost" and d.secondary


@pytest.mark.parametrize("name, cause, words", [
    ("metal_gpu_timeout.txt", "metal_timeout", "kIOGPUCommandBufferCallbackErrorTimeout"),
    ("metal_out_of_memory.txt", "metal_oom", "ran out of GPU memory"),
    ("import_error.txt", "import_error", "no module 'nonexistent_pkg_xyz'"),
    ("mpi_double_init.txt", "mpi_double_init", "mpi4py.rc.initialize = False"),
])
def test_recorded_failures(name, cause, words):
    d = classify(lines(name), rank=2)
    assert d is not None and d.cause == cause and words in d.message, d


def test_unknown_output_has_no_diagnosis():
    assert classify(["Traceback (most recent call last):", "ValueError: bad shape"], rank=0) is None


def test_a_rank_left_alone_in_the_quiet_wait_is_secondary():
    d = classify(lines("quiet_wait_peer_lost.txt"), rank=0)
    assert d is not None and d.cause == "quiet_wait_peer_lost" and d.secondary and "rank 0" in d.message


def test_a_rank_that_stopped_because_another_failed_is_secondary():
    # The last lines of rank 1 in `orch run recipes/mlp_regression.py -n 2 -- --resume /nonexistent`
    # (recorded from this runtime): rank 0 had the real error, rank 1 stopped with it.
    tail = [
        '  File "/work/main/orchestrator/runtime/trainer.py", line 227, in __init__',
        "    self._stop_together(resume_problem)",
        '  File "/work/main/orchestrator/runtime/trainer.py", line 315, in _stop_together',
        '    raise RuntimeError(f"stopping: {failed} other rank(s) failed to start (see their output)")',
        "RuntimeError: stopping: 1 other rank(s) failed to start (see their output)",
    ]
    d = classify(tail, rank=1)
    assert d is not None and d.cause == "peer_failed" and d.secondary and "rank 1" in d.message
    own = ["RuntimeError: --resume /nonexistent: no such file or directory"]
    assert classify(own, rank=0) is None  # the real error is nobody's casualty
