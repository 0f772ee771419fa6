"""What a rank runs: SCRIPT.py, -m MODULE, or -- PROGRAM; and argument routing that cannot surprise.

Real `orch run` processes on local ranks (the same supervision for every form):
a package module with a relative import (which `runpy.run_path` could not
run), a non-Python program (exec'd, its exit code the run's), a Python
console script on PATH (run in-process, so its `mx.distributed.init` is seen).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import pytest

from orchestrator.hostfile import ConfigError, Hostfile, Host, hosts_hostfile, select_hosts
from tests.orch_helpers import events, run_orch, summary

pytestmark = pytest.mark.slow


@pytest.fixture
def pkg(tmp_path):
    """A package whose __main__ uses a relative import and prints what a torchrun-style script reads."""
    d = tmp_path / "mypkg"
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "helper.py").write_text("X = 42\n")
    (d / "__main__.py").write_text(textwrap.dedent("""
        import json, os, sys
        from . import helper
        print("REPORT " + json.dumps({"x": helper.X, "argv": sys.argv[1:], "name": __name__,
              **{k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MLX_RANK")}}))
    """))
    return tmp_path


def reports(r) -> list[dict]:
    return sorted((json.loads(line.split("REPORT ", 1)[1]) for line in r.stdout.splitlines() if "REPORT " in line),
                  key=lambda d: d["RANK"])


@pytest.mark.parametrize("form", [["-m", "mypkg", "--"], ["--", "-m", "mypkg"]])
def test_module_form_runs_a_package_with_relative_imports(pkg, form):
    rd = pkg / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), *form, "--steps", "3", "-n", "9", cwd=pkg)
    assert r.returncode == 0, r.stderr
    got = reports(r)
    assert [g["RANK"] for g in got] == ["0", "1"]
    for i, g in enumerate(got):
        assert g["x"] == 42 and g["name"] == "__main__"
        assert g["argv"] == ["--steps", "3", "-n", "9"]  # after --, verbatim: -n 9 is the program's
        assert (g["WORLD_SIZE"], g["LOCAL_RANK"], g["LOCAL_WORLD_SIZE"], g["MLX_RANK"]) == ("2", str(i), "2", str(i))
    s = summary(rd)
    assert s["status"] == "succeeded" and s["world_size"] == 2


def test_command_form_execs_any_program_and_keeps_its_exit_code(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "--", "sh", "-c", 'echo "hello from $RANK"; [ "$RANK" = 1 ] && exit 3; exit 0',
                 cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "[0] hello from 0" in r.stdout and "[1] hello from 1" in r.stdout
    s = summary(rd)
    assert s["failed_rank"] == 1 and s["exit_code"] == 3
    assert "hello from 1" in (rd / "logs" / "rank-1.log").read_text()


def test_console_script_on_path_runs_under_the_init_hook(tmp_path):
    """A Python console script (``mlx_lm.lora``-style) is run in-process: orch sees its init and ready."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "my-trainer"
    tool.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import sys
        import mlx.core as mx
        g = mx.distributed.init()
        x = mx.distributed.all_sum(mx.array([g.rank() + 1.0]))
        print("SUM", x.item(), sys.argv[1:])
    """))
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    rd = tmp_path / "run"
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "--", "my-trainer", "--flag", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("SUM 3.0 ['--flag']") == 2
    kinds = [e["kind"] for e in events(rd)]
    assert kinds.count("ready") == 2, kinds


@pytest.mark.parametrize("args, expected", [
    (["-n", "2", "train.py", "-n", "5"], "-n given twice"),
    (["-n", "2", "--hang-timout", "5", "train.py"], "did you mean --hang-timeout?"),
    (["-n", "2", "train.py", "--lr", "3"], "unknown option --lr"),
    (["-n", "2", "a.py", "b.py"], "a second program or stray argument: b.py"),
    (["-n", "2", "-m", "mypkg", "a.py"], "two programs"),
    (["-n", "2"], "no program"),
    (["-n", "2", "-m", "not a module", "--"], "not a module name"),
    (["-n", "2", "--", "-u", "train.py"], "-- -u: after --, only -m MODULE goes to the rank's Python"),
    (["-n", "2", "--", "-c", "print('RAN')"], "only -m MODULE goes to the rank's Python"),
    (["-n", "2", "run.sh"], "run.sh: not a Python file (its first line is #!/bin/sh); run it as a program: "
                            "orch run [OPTIONS] -- run.sh [ARGS]"),
    (["-n", "2", "adir"], "adir: a directory, not a script"),
    (["-n", "2", "--python", "no-such-python3", "train.py"], "--python no-such-python3: no such interpreter here"),
])
def test_routing_errors_are_one_line_and_start_nothing(tmp_path, args, expected):
    (tmp_path / "train.py").write_text("print('RAN')\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho RAN\n")
    (tmp_path / "adir").mkdir()
    r = run_orch("run", *args, cwd=tmp_path, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "RAN" not in r.stdout and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_hosts_shortcut_and_include_exclude():
    h = hosts_hostfile("127.0.0.1,localhost", 2)
    assert [x.name for x in h.hosts] == ["127.0.0.1", "localhost"]
    assert [x.ips for x in h.hosts] == [["127.0.0.1"], ["127.0.0.1"]]
    assert h.world_size == 4
    for bad, words in (("a,,b", "empty host name"), ("x,x", "named twice"), ("no-such-host.invalid", "cannot resolve")):
        with pytest.raises(ConfigError, match=words):
            hosts_hostfile(bad)
    hf = Hostfile(hosts=[Host(name=n, ips=[f"10.0.0.{i + 1}"]) for i, n in enumerate(("mac1", "mac2", "mac3"))], path="h.json")
    assert [x.name for x in select_hosts(hf, "mac1,mac3", None).hosts] == ["mac1", "mac3"]
    assert [x.name for x in select_hosts(hf, None, "mac2").hosts] == ["mac1", "mac3"]
    with pytest.raises(ConfigError, match="no host named 'mac9'"):
        select_hosts(hf, None, "mac9")
    with pytest.raises(ConfigError, match="leave no host"):
        select_hosts(hf, "mac1", "mac1")


def test_a_missing_module_is_one_line_from_each_rank_not_a_traceback(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "-m", "no_such_module_xyz", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    for rank in range(2):
        log = (rd / "logs" / f"rank-{rank}.log").read_text().strip().splitlines()
        assert len(log) == 1 and log[0].startswith("orch: no module named 'no_such_module_xyz' for this rank's Python"), log
    assert "Traceback" not in r.stderr and "runpy" not in r.stderr


def test_a_script_that_does_not_compile_shows_python_s_report_without_orch_s_frames(tmp_path):
    (tmp_path / "bad.py").write_text("def f(:\n    pass\n")
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "bad.py", cwd=tmp_path, timeout=60)
    assert r.returncode == 1, r.stderr
    log = (rd / "logs" / "rank-0.log").read_text()
    assert f'File "{tmp_path / "bad.py"}", line 1' in log and "SyntaxError" in log, log
    assert "bootstrap" not in log and "runpy" not in log and "Traceback" not in log, log
