"""The `-m MODULE` and `-- PROGRAM` forms under the other transports: over SSH and under mpirun.

Issue 13 asks for the same supervision for every form "locally, over SSH and
under MPI". tests/test_program_forms.py covers local ranks; here the same
package (with a relative import) and a plain command run on two
network-namespace hosts with real sshd, and under a real mpirun. Each rank
reports its torchrun-style variables, so a form that loses the environment on
one transport fails here. A failing command's exit code must come back too.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from tests.netns import make_cluster_fixture
from tests.orch_helpers import run_orch, summary

pytestmark = pytest.mark.slow

c2 = make_cluster_fixture(2, scope="module", name="c2")

real_mpi = pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "mpirun").exists() and not shutil.which("mpirun"),
                              reason="needs Open MPI's mpirun")


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    """A package whose __main__ uses a relative import, and a script that exits with a code chosen per rank."""
    d = tmp_path / "mypkg"
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "helper.py").write_text("X = 42\n")
    (d / "__main__.py").write_text(textwrap.dedent("""
        import json, os, sys
        from . import helper
        print("REPORT " + json.dumps({"x": helper.X, "argv": sys.argv[1:],
              **{k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MLX_RANK")}}),
              flush=True)
    """))
    (tmp_path / "fail_on_one.py").write_text(textwrap.dedent("""
        import os, sys
        print("rank", os.environ["RANK"], "here", flush=True)
        sys.exit(7 if os.environ["RANK"] == "1" else 0)
    """))
    return tmp_path


def reports(r) -> list[dict]:
    return sorted((json.loads(line.split("REPORT ", 1)[1]) for line in r.stdout.splitlines() if "REPORT " in line),
                  key=lambda d: str(d["RANK"]))


def _check(r, rd: Path, world: int, local_world: int, mlx_rank: bool = True) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    got = reports(r)
    assert [g["RANK"] for g in got] == [str(i) for i in range(world)], r.stdout[-3000:]
    for i, g in enumerate(got):
        assert g["x"] == 42 and g["argv"] == ["--steps", "3", "-n", "9"]
        assert (g["WORLD_SIZE"], g["LOCAL_WORLD_SIZE"]) == (str(world), str(local_world))
        assert g["MLX_RANK"] == (str(i) if mlx_rank else None)  # MLX's MPI backend asks Open MPI, as mlx.launch
        assert g["LOCAL_RANK"] == str(i % local_world)
    s = summary(rd)
    assert s["status"] == "succeeded" and s["world_size"] == world


def _ssh_args(c, tmp_path: Path) -> list[str]:
    hosts = [{"ssh": h.name, "ips": [h.mgmt_ip]} for h in c.hosts]
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    return ["--hostfile", str(hf), "--ssh-config", c.ssh_config_path, "--known-hosts", c.known_hosts_path,
            "--python", sys.executable]


@pytest.mark.netns
@pytest.mark.timeout(180)
@pytest.mark.parametrize("form", [["-m", "mypkg", "--"], ["--", "-m", "mypkg"]])
def test_module_form_over_ssh(c2, pkg, form):
    # -m and -- programs are not staged: they run from the host's own files (here the hosts share this
    # filesystem), in --cwd, as with mlx.launch.
    rd = pkg / "run"
    r = run_orch("run", *_ssh_args(c2, pkg), "--cwd", str(pkg), "--run-dir", str(rd), *form,
                 "--steps", "3", "-n", "9", cwd=pkg, timeout=150)
    _check(r, rd, world=2, local_world=1)


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_command_form_over_ssh_keeps_the_failing_ranks_code(c2, pkg):
    rd = pkg / "run"
    r = run_orch("run", *_ssh_args(c2, pkg), "--cwd", str(pkg), "--run-dir", str(rd), "--",
                 sys.executable, "fail_on_one.py", cwd=pkg, timeout=150)
    assert r.returncode == 7, r.stderr[-3000:]
    s = summary(rd)
    assert s["status"] == "failed" and s["failed_rank"] == 1 and s["exit_code"] == 7, s
    assert "here" in (rd / "logs" / "rank-1.log").read_text()


@real_mpi
@pytest.mark.timeout(180)
@pytest.mark.parametrize("form", [["-m", "mypkg", "--"], ["--", "-m", "mypkg"]])
def test_module_form_under_mpirun(pkg, form):
    rd = pkg / "run"
    r = run_orch("run", "-n", "2", "--backend", "mpi", "--cwd", str(pkg), "--run-dir", str(rd), *form,
                 "--steps", "3", "-n", "9", cwd=pkg, timeout=150)
    _check(r, rd, world=2, local_world=2, mlx_rank=False)


@real_mpi
@pytest.mark.timeout(180)
def test_command_form_under_mpirun_keeps_the_failing_ranks_code(pkg):
    rd = pkg / "run"
    r = run_orch("run", "-n", "2", "--backend", "mpi", "--cwd", str(pkg), "--run-dir", str(rd), "--",
                 sys.executable, "fail_on_one.py", cwd=pkg, timeout=150)
    assert r.returncode == 7, r.stderr[-3000:]
    s = summary(rd)
    assert s["status"] == "failed" and s["failed_rank"] == 1 and s["exit_code"] == 7, s
