"""Bad values on the command line, a busy or impossible run directory, Ctrl-C before the ranks run,
a reader that went away, and the open-file limit: one line and the right exit code, never a traceback."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.hostfile import ConfigError
from orchestrator.run import RunRequest, run_job
from orchestrator.rundir import LOCK_FILE, RunDir
from tests.orch_helpers import ROOT, SCRIPTS, alive, finish, kill_tree, orch_argv, start_orch, wait_for_line


@pytest.fixture
def script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCH_PRESPAWN", "0")  # in-process main(): start nothing ahead
    s = tmp_path / "s.py"
    s.write_text("print('ran')\n")
    return s


def _main_error(capsys, *argv: str) -> str:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--starting-port", "0"], "--starting-port 0: not a TCP port"),
    (["--starting-port", "-5"], "--starting-port -5: not a TCP port"),
    (["--starting-port", "65536"], "--starting-port 65536: not a TCP port; give one in 1-65535"),
    (["--init-timeout", "0"], "--init-timeout 0: must be a positive, finite number of seconds"),
    (["--run-dir", ""], "--run-dir '': an empty path; give a directory"),
    (["--init-timeout", "-1"], "--init-timeout -1: must be a positive"),
    (["--init-timeout", "nan"], "--init-timeout nan: must be a positive"),
    (["--hang-timeout", "inf"], "--hang-timeout inf: must be a positive"),
    (["--hang-timeout", "-3"], "--hang-timeout -3:"),
    (["--first-step-timeout", "0"], "--first-step-timeout 0:"),
    (["--first-step-timeout", "NaN"], "--first-step-timeout nan:"),
    (["--grace", "0"], "--grace 0: must be a positive"),
    (["--grace=-inf"], "--grace -inf:"),
    (["--connect-timeout", "-1"], "--connect-timeout -1:"),
    (["--restart-backoff", "-0.5"], "--restart-backoff -0.5: must be 0 or a positive number"),
    (["--restart-backoff", "nan"], "--restart-backoff nan:"),
    (["--max-restarts", "-1"], "--max-restarts -1: must be 0 or more"),
    (["-n", "0"], "-n 0: the number of ranks must be at least 1"),
    (["-n", "-2"], "-n -2: the number of ranks must be at least 1"),
    (["-n", "100000"], "-n 100000: at most 1024 local ranks"),
])
def test_bad_values_are_one_line_exit_2_and_nothing_is_created(script, capsys, args, expected):
    line = _main_error(capsys, "run", str(script), *args)
    assert expected in line, line
    assert not Path("runs").exists()


def test_zero_restart_backoff_is_fine(script, capsys):
    assert cli.main(["run", str(script), "--restart-backoff", "0", "--quiet"]) == 0


def test_run_dir_that_is_a_file_or_under_a_file(script, capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert "is a file, not a directory" in _main_error(capsys, "run", str(script), "--run-dir", str(f))
    line = _main_error(capsys, "run", str(script), "--run-dir", str(f / "sub"))
    assert f"--run-dir {f / 'sub'}: cannot create the run directory (a part of the path is a file)" in line
    assert f.read_text() == "x"


def test_run_dir_that_cannot_be_created(script, capsys, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; a read-only place that root cannot write either:
        target = Path("/proc/orch-run-dir")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "run"
    line = _main_error(capsys, "run", str(script), "--run-dir", str(target))
    assert f"--run-dir {target}: cannot create the run directory" in line


def test_run_job_surfaces_a_busy_run_dir_before_anything_starts(script, tmp_path):
    held = RunDir(tmp_path / "run")
    held.lock()
    try:
        marker = tmp_path / "started"
        script.write_text(f"open({str(marker)!r}, 'w').close()\n")
        with pytest.raises(ConfigError, match=rf"another orch run \(pid {os.getpid()}\) is using this run directory"):
            run_job(RunRequest(script=str(script), n=1, run_dir=str(tmp_path / "run"), echo=False))
        assert not marker.exists() and not (tmp_path / "run" / "summary.json").exists()
    finally:
        held.close()
    assert run_job(RunRequest(script=str(script), n=1, run_dir=str(tmp_path / "run"), echo=False)).exit_code == 0
    assert marker.exists(), "once the lock is released the directory is usable again"


def test_a_run_gives_the_signal_handlers_it_found_back(tmp_path):
    """The supervisor and the restart back-off take SIGINT/SIGTERM over; afterwards what was installed before
    (asyncio.run's Ctrl-C handler for a later attempt, a test runner's SIGTERM cleanup) is there again."""
    script = tmp_path / "crash.py"
    script.write_text("import sys; sys.exit(3)\n")
    mine = {sig: (lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    before = {sig: signal.signal(sig, h) for sig, h in mine.items()}
    try:
        s = run_job(RunRequest(script=str(script), n=1, run_dir=str(tmp_path / "run"), echo=False, max_restarts=1,
                               restart_backoff=0.01))
        assert s.exit_code == 3 and s.restarts == 1  # two supervisors and one back-off took the signals over
        assert all(signal.getsignal(sig) is h for sig, h in mine.items())
    finally:
        for sig, h in before.items():
            signal.signal(sig, h)


def test_a_second_run_in_the_same_run_dir_is_refused_naming_the_first(tmp_path):
    """Two real `orch run`s: the second exits 2 naming the first's pid; the first is untouched."""
    run_dir = tmp_path / "run"
    first = start_orch("run", str(SCRIPTS / "sleeper.py"), "-n", "2", "--run-dir", str(run_dir), "--", "30", cwd=tmp_path)
    try:
        wait_for_line(first, "sleeping", count=2, timeout=90)
        assert (run_dir / LOCK_FILE).read_text().strip() == str(first.pid)
        r = finish(start_orch("run", str(SCRIPTS / "sleeper.py"), "-n", "1", "--run-dir", str(run_dir), cwd=tmp_path), 60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"orch: error: --run-dir {run_dir}: another orch run (pid {first.pid}) is using "
                                    "this run directory; wait for it to finish or give another --run-dir"), r.stderr
        assert first.poll() is None
        assert not (run_dir / "logs" / "attempt-1").exists() and len(list((run_dir / "logs").glob("rank-*.log"))) == 2
        first.send_signal(signal.SIGINT)
        assert finish(first, 60).returncode == 130
    finally:
        kill_tree(first.pid)
    assert (run_dir / LOCK_FILE).read_text() == "", "the pid is cleared when the run ends"


# ----------------------------------------------------------------------------- Ctrl-C during start-up

_INTERRUPT_AT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import {module} as target
    real = getattr(target, {name!r})

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, at exactly this moment
        time.sleep(0.2)
        return real(*args, **kwargs)

    async def interrupted_async(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        return await real(*args, **kwargs)

    import inspect
    setattr(target, {name!r}, interrupted_async if inspect.iscoroutinefunction(real) else interrupted)
    from orchestrator import cli
    if {defer!r}:
        cli.defer_interrupts()  # what the orch command does first (cli.entry)
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("module, name, local, defer", [
    ("orchestrator.launch.prespawn", "start", True, False),       # before parsing: ranks being pre-started
    ("orchestrator.launch.prespawn", "start", True, True),        # the same, as the orch command: noted, then raised
    ("orchestrator.hostfile", "load_hostfile", False, False),     # loading the hostfile
    ("orchestrator.run.resolve", "plan_job", False, False),       # planning, inside the event loop
    ("orchestrator.launch.local.LocalLauncher", "prepare", False, False),  # the launcher getting ready
    ("orchestrator.launch.local.LocalLauncher", "prepare", True, True),    # pre-started ranks being configured
])
def test_ctrl_c_during_start_up_exits_130_without_traceback(tmp_path, module, name, local, defer):
    if local and name == "prepare" and sys.version_info < (3, 11):
        pytest.skip("asyncio.run turns Ctrl-C into a cancellation from Python 3.11 on")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"hosts": [{"ssh": "localhost", "slots": 2}]}))
    mod, is_class, _ = module.partition(".LocalLauncher")
    code = _INTERRUPT_AT.format(root=str(ROOT), module=mod, name=name, defer=defer)
    if is_class:
        code = code.replace("import orchestrator.launch.local as target",
                            "from orchestrator.launch.local import LocalLauncher as target")
    where = ["-n", "2"] if local else ["--hostfile", str(hostfile)]
    p = subprocess.Popen([sys.executable, "-c", code, "run", str(SCRIPTS / "sleeper.py"), *where, "--run-dir",
                          str(tmp_path / "run")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        r = finish(p, 60)
        assert r.returncode == 130, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "sleeping" not in r.stdout, r.stderr
        if defer and name == "start":  # noted while loading, raised before anything was made
            assert r.stderr.strip().splitlines()[-1] == "orch: interrupted" and not (tmp_path / "run").exists()
        if local and name == "prepare":  # the ranks got their configuration, the supervisor never took them
            assert "interrupted while starting: the ranks were stopped as they started" in r.stderr, r.stderr
            assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
        left = [q.pid for q in _session(p.pid)]
        assert alive(left, timeout=15) == [], "nothing it started outlives it"
    finally:
        for q in _session(p.pid):
            kill_tree(q.pid)


def _session(sid: int):
    import psutil

    out = []
    for q in psutil.process_iter():
        try:
            if os.getsid(q.pid) == sid:
                out.append(q)
        except (ProcessLookupError, PermissionError):
            pass
    return out


# ----------------------------------------------------------------------------- a reader that went away


def _closed_pipe_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)  # like `| head` that has already exited
    try:
        p = subprocess.Popen(orch_argv(*args), cwd=cwd, stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    _, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, "", err)


def _fake_runs(root: Path, count: int) -> None:
    for i in range(count):
        d = root / f"2026010{1 + i % 9}T00000{i % 10}.00Z-train-{i}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({
            "status": "succeeded", "exit_code": 0, "duration_s": 1.0 + i, "started_at": "2026-01-01T00:00:00Z",
            "script": "train.py", "backend": "ring", "world_size": 2, "run_dir": str(d), "ranks": []}))


def test_runs_into_a_closed_pipe_is_quiet(tmp_path):
    _fake_runs(tmp_path / "runs", 30)
    r = _closed_pipe_run("runs", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == cli.EXIT_BROKEN_PIPE and r.stderr == "", r.stderr


def test_report_into_a_closed_pipe_is_quiet(tmp_path):
    _fake_runs(tmp_path / "runs", 1)
    run = next((tmp_path / "runs").iterdir())
    r = _closed_pipe_run("report", str(run), cwd=tmp_path)
    assert r.returncode == cli.EXIT_BROKEN_PIPE and r.stderr == "", r.stderr
    assert (run / "report.html").is_file(), "the report is still written; only printing was cut short"


def test_runs_piped_into_head_really(tmp_path):
    _fake_runs(tmp_path / "runs", 30)
    cmd = " ".join(orch_argv("runs", str(tmp_path / "runs"), "-n", "0")) + " | head -n 1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("started") and len(r.stdout.splitlines()) == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.returncode in (0, cli.EXIT_BROKEN_PIPE)


# ----------------------------------------------------------------------------- open-file limit


def test_the_controller_raises_its_open_file_limit_for_itself_and_its_ranks(tmp_path):
    """macOS starts processes with a soft limit of 256; orch raises it, and the ranks inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if expected <= 256:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")
    report = tmp_path / "limits.py"
    report.write_text("import resource; print('nofile', resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)\n")

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    p = subprocess.Popen(orch_argv("run", str(report), "-n", "2"), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=low_limit, start_new_session=True)
    r = finish(p, 120)
    assert r.returncode == 0, r.stderr
    limits = {line.split()[-1] for line in r.stdout.splitlines() if "nofile" in line}
    assert limits == {str(expected)}, r.stdout


@pytest.mark.parametrize("with_thread", [False, True])
def test_the_quick_exit_keeps_every_byte_and_the_code(tmp_path, with_thread):
    """``orch`` ends with os._exit after ``main`` (no interpreter teardown): a file object left open with
    bytes in its buffer still gets them on disk, stdout's last line is printed, the code is main's; with a
    thread still running, the normal exit (which joins it) is kept."""
    import subprocess
    import sys

    out = tmp_path / "left-open.txt"
    prog = f"""
import sys, threading, time
import orchestrator.cli as cli
def fake_main():
    f = open({str(out)!r}, "w", buffering=1 << 20)
    f.write("every byte")
    sys.stdout.write("last words")
    if {with_thread}:
        threading.Thread(target=lambda: (time.sleep(0.5), open({str(out)!r} + ".thread", "w").write("joined"))).start()
    fake_main.keep = f
    return 3
cli.main = fake_main
cli.entry()
"""
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "last words"
    assert out.read_text() == "every byte"
    assert (tmp_path / "left-open.txt.thread").exists() == with_thread


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flags_print_the_version(flag, capsys):
    from orchestrator import __version__

    with pytest.raises(SystemExit) as e:
        cli.main([flag])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"orch {__version__}"
