"""The suite's own hygiene: a pytest ended by SIGTERM (a CI timeout) still cleans up what its test started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.orch_helpers import ROOT

TEST = '''
import subprocess, time, pathlib, pytest

@pytest.fixture
def child(tmp_path_factory):
    p = subprocess.Popen(["sleep", "300"])
    pathlib.Path({out!r}, "pid").write_text(str(p.pid))
    yield p
    p.kill()
    p.wait()
    pathlib.Path({out!r}, "cleaned").write_text("fixture")

def test_runs_until_terminated(child):
    try:
        pathlib.Path({out!r}, "started").write_text("in the test")
        time.sleep(120)
    finally:
        pathlib.Path({out!r}, "finally").write_text("test")
'''


def _wait_for(path: Path, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


def test_sigterm_to_pytest_runs_the_fixture_teardown_and_the_tests_finally(tmp_path):
    (tmp_path / "test_victim.py").write_text(TEST.format(out=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.sigterm",
                          str(tmp_path / "test_victim.py")], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    child = None
    try:
        assert _wait_for(tmp_path / "started"), "the victim test never started"
        child = int((tmp_path / "pid").read_text())
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=60)[0].decode(errors="replace")
        assert (tmp_path / "finally").exists(), f"the test's finally did not run:\n{out[-2000:]}"
        assert (tmp_path / "cleaned").exists(), f"the fixture's teardown did not run:\n{out[-2000:]}"
        assert not _alive(child), f"the victim's child {child} survived the SIGTERM"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
        if child is not None and _alive(child):  # what the victim left: ours (it started it), by pid
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """The fixture reaps its child, so a live pid after the teardown is that child, left running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
