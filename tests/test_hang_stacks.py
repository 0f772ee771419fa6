"""A hang in any program is caught, and the diagnosis says where each rank is (its Python stack).

Real ranks: two processes step with all_sum and ``report.step``; one stops in
a Python function. The watchdog fires, the controller asks every guard for a
stack dump (faulthandler on the dump signal), and the diagnosis quotes the
top frames: the hung rank in ``wait_here``, the other in ``main`` at its
all_sum line. The stacks are in the logs too.
"""

from __future__ import annotations

import pytest

from orchestrator.programs import top_frames
from tests.orch_helpers import SCRIPTS, run_orch, summary

pytestmark = pytest.mark.slow


def test_hang_diagnosis_quotes_each_ranks_python_stack(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "--hang-timeout", "4", "--first-step-timeout", "60",
                 str(SCRIPTS / "hang_in_python.py"), cwd=tmp_path, env={"HANG_RANK": "1"}, timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    s = summary(rd)
    assert s["status"] == "failed" and s["reason"].startswith("hang:"), s["reason"]
    assert "rank 1 is in wait_here at hang_in_python.py:" in s["reason"], s["reason"]
    assert "rank 0 is in main at hang_in_python.py:" in s["reason"], s["reason"]
    log1 = (rd / "logs" / "rank-1.log").read_text()
    assert "most recent call first" in log1 and "wait_here" in log1
    assert "most recent call first" not in r.stderr + r.stdout  # the stacks are in the logs, not on the console


def test_top_frames_reads_the_last_dump_and_the_main_thread():
    lines = [
        "old output", "MARK",
        "Current thread 0x00007f0000000001 (most recent call first):",
        '  File "/a/old.py", line 1 in stale',
        "MARK",
        "Thread 0x00007f0000000002 (most recent call first):",
        '  File "/usr/lib/python3.11/threading.py", line 331 in wait',
        "",
        "Current thread 0x00007f0000000003 (most recent call first):",
        '  File "/x/trainer.py", line 255 in _average',
        '  File "/x/trainer.py", line 300 in step',
        '  File "/x/trainer.py", line 400 in run',
    ]
    assert top_frames(lines, "MARK") == "_average at trainer.py:255 (from step at trainer.py:300)"
    assert top_frames(["no dump here"], "MARK") is None
    assert top_frames(["MARK", "just text"], "MARK") is None
