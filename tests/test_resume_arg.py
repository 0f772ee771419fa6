"""``--resume-from GLOB --resume-arg TEMPLATE``: restarts for programs that are not ours.

A real program (tests/scripts/resume_counter.py) writes a numbered file per
step, crashes once, and continues from the file it is handed, as mlx-lm does
with ``--resume-adapter-file``. The run must finish with every step done once
after the crash point, and summary.json must say what was resumed from. Bad
combinations of the options are one line and exit 2, before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.run import newest_match
from tests.netns import make_cluster_fixture
from tests.orch_helpers import SCRIPTS, orch_argv, run_orch, summary

COUNTER = SCRIPTS / "resume_counter.py"


def _run(tmp_path: Path, *extra: str, script_args=("--steps", "6", "--crash-at", "3")):
    rd = tmp_path / "run"
    r = run_orch("run", str(COUNTER), "-n", "2", "--max-restarts", "1", "--restart-backoff", "0",
                 "--run-dir", str(rd), *extra, "--", *script_args, cwd=tmp_path,
                 env={"CRASH_MARKER": str(tmp_path / "crashed")}, timeout=120)
    return r, rd


@pytest.mark.slow
def test_a_crashed_program_resumes_from_the_newest_file_and_finishes(tmp_path):
    r, rd = _run(tmp_path, "--resume-from", "out/step-*.txt", "--resume-arg", "--start-from {latest}")
    assert r.returncode == 0, r.stderr
    latest = str(rd / "out" / "step-0003.txt")
    # The second attempt was handed the newest file and did only the steps after it.
    assert "[0] crashing after step 3" in r.stdout
    assert f"[0] resuming from step 3 ({latest})" in r.stdout and "[0] ran steps 4 5 6" in r.stdout
    assert f"orch: attempt 1 resumes from {latest} (--start-from {latest})" in r.stderr
    assert sorted(p.name for p in (rd / "out").iterdir()) == [f"step-{i:04d}.txt" for i in range(1, 7)]
    s = summary(rd)
    assert s["status"] == "succeeded" and s["restarts"] == 1
    first, second = s["attempts"]
    assert first["status"] == "failed" and first["exit_code"] == 3 and not first["resumed"]
    assert second["status"] == "succeeded" and second["resumed"] is True
    assert second["note"] == f"resumed from {latest} (--resume-arg)"
    # The first attempt's arguments were the user's own; only the restart got the template's words.
    assert "resuming" not in (rd / "logs" / "rank-0.log").read_text()
    assert "resuming from step 3" in (rd / "logs" / "attempt-1" / "rank-0.log").read_text()


@pytest.mark.slow
def test_no_matching_file_restarts_without_the_argument_and_says_so(tmp_path):
    r, rd = _run(tmp_path, "--resume-from", "nowhere/*.bin", "--resume-arg", "--start-from {latest}")
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stdout and "[0] ran steps 1 2 3 4 5 6" in r.stdout
    assert "no file matched --resume-from nowhere/*.bin" in r.stderr
    second = summary(rd)["attempts"][1]
    assert second["resumed"] is False and "no file matched --resume-from nowhere/*.bin" in second["note"]
    assert "without --resume-arg" in second["note"]


@pytest.mark.parametrize("args, words", [
    (["--max-restarts", "1", "--resume-from", "a/*", "--resume-arg", "--resume-adapter-file x"], "no {latest}"),
    (["--max-restarts", "1", "--resume-from", "a/*", "--resume-arg", "--resume"], "written --resume-arg=VALUE"),
    (["--resume-from", "a/*", "--resume-arg", "--x {latest}"], "add --max-restarts"),
    (["--max-restarts", "1", "--resume-arg", "--x {latest}"], "add --resume-from"),
    (["--max-restarts", "1", "--resume-from", "a/*"], "add --resume-arg"),
    (["--max-restarts", "1", "--resume-from", "a/*", "--resume-arg", "--x '{latest}"], "quote the template"),
])
def test_bad_combinations_are_one_line_exit_2(tmp_path, args, words):
    r = subprocess.run(orch_argv("run", str(COUNTER), "-n", "1", *args, "--run-dir", str(tmp_path / "run")),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_remote_hosts_under_mpi_are_refused_in_one_line(tmp_path):
    hf = tmp_path / "hosts.json"
    hf.write_text('{"hosts": [{"ssh": "mac-remote-1", "ips": ["10.9.0.1"]}, {"ssh": "mac-remote-2", "ips": ["10.9.0.2"]}]}')
    r = subprocess.run(orch_argv("run", str(COUNTER), "--hostfile", str(hf), "--backend", "mpi", "--max-restarts", "1",
                                 "--resume-from", "a/*", "--resume-arg", "--x {latest}", "--run-dir", str(tmp_path / "run")),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "mpi backend remote hosts" in r.stderr, r.stderr


def test_a_template_that_starts_with_dashes_is_a_value_not_an_unknown_option(tmp_path):
    """argparse reads a word with a space as a value; the routing check must agree (not 'unknown option')."""
    r = subprocess.run(orch_argv("run", str(COUNTER), "-n", "1", "--resume-arg", "--resume-adapter-file {latest}",
                                 "--resume-from", "a/*", "--run-dir", str(tmp_path / "run")),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "add --max-restarts" in r.stderr, r.stderr


def test_newest_match_is_by_modification_time_then_name_and_files_only(tmp_path):
    d = tmp_path / "adapters"
    d.mkdir()
    now = time.time()
    for name, age in (("0000100_adapters.safetensors", 30), ("0000300_adapters.safetensors", 10),
                      ("0000200_adapters.safetensors", 20)):
        (d / name).write_text(name)
        os.utime(d / name, (now - age, now - age))
    (d / "0000900_adapters.safetensors.d").mkdir()  # a directory never matches as a file
    assert newest_match("adapters/*_adapters.safetensors*", tmp_path) == str(d / "0000300_adapters.safetensors")
    os.utime(d / "0000100_adapters.safetensors", (now, now))  # newest by time wins over the larger number
    assert newest_match("adapters/*_adapters.safetensors", tmp_path) == str(d / "0000100_adapters.safetensors")
    assert newest_match(str(d / "*.safetensors"), Path("/nonexistent")) == str(d / "0000100_adapters.safetensors")
    assert newest_match("**/0000200_*", tmp_path) == str(d / "0000200_adapters.safetensors")
    assert newest_match("adapters/*.npz", tmp_path) is None


# ----------------------------------------------------------------------------- over SSH (netns hosts, real sshd)

c2r = make_cluster_fixture(2, scope="module", name="c2r")


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(240)
def test_remote_restart_gets_its_own_copy_of_the_collected_file(c2r, tmp_path):
    """Rank 0 writes its files on a remote host; they come home; the restart's hosts each get the newest one."""
    c = c2r
    hosts = [{"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c.hosts]
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    rd = tmp_path / "run"
    r = run_orch("run", str(COUNTER), "--hostfile", str(hf), "--ssh-config", c.ssh_config_path,
                 "--known-hosts", str(c.known_hosts_path), "--python", sys.executable, "--run-dir", str(rd),
                 "--env", f"CRASH_MARKER={tmp_path / 'crashed'}", "--max-restarts", "1", "--restart-backoff", "0",
                 "--resume-from", "out/step-*.txt", "--resume-arg", "--start-from {latest}",
                 "--", "--steps", "6", "--crash-at", "3", cwd=tmp_path, timeout=200)
    assert r.returncode == 0, r.stderr
    assert "[0] resuming from step 3 (" in r.stdout and "[0] ran steps 4 5 6" in r.stdout
    # The rank read a copy on its own host (in its run root, beside run/), not the controller's file.
    said = next(l for l in r.stdout.splitlines() if "[0] resuming from step 3 (" in l)
    assert str(rd) not in said and said.endswith("/resume/step-0003.txt)"), said
    assert sorted(p.name for p in (rd / "out").iterdir()) == [f"step-{i:04d}.txt" for i in range(1, 7)]
    assert not (rd / "resume").exists()  # the copy is an input: it does not come back
    second = summary(rd)["attempts"][1]
    assert second["resumed"] is True and second["note"] == f"resumed from {rd / 'out' / 'step-0003.txt'} (--resume-arg)"


# ----------------------------------------------------------------------------- mlx-lm, unmodified

CRASH_AFTER_SAVE = SCRIPTS / "crash_after_adapter_save"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlx_lm_lora_restarts_from_its_newest_adapter_file(tmp_path):
    """The README example: mlx_lm.lora dies after saving an adapter; the restart gets --resume-adapter-file."""
    pytest.importorskip("mlx_lm")
    from tests.mlxlm_fixture import OFFLINE_ENV, build

    fx = build(tmp_path / "fixture")
    rd = tmp_path / "run"
    marker = tmp_path / "crashed"
    env = {**OFFLINE_ENV, "ORCH_TEST_CRASH_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(p for p in (str(CRASH_AFTER_SAVE), os.environ.get("PYTHONPATH")) if p)}
    r = run_orch("run", "-n", "2", "--max-restarts", "1", "--restart-backoff", "0", "--run-dir", str(rd),
                 "--resume-from", "adapters/*_adapters.safetensors", "--resume-arg", "--resume-adapter-file {latest}",
                 "--", "mlx_lm.lora", *fx.lora_args(rd / "adapters", iters=10), "--save-every", "5",
                 cwd=tmp_path, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    first_save = str(rd / "adapters" / "0000005_adapters.safetensors")
    assert marker.read_text() == first_save  # the crash really happened, right after that save
    first, second = summary(rd)["attempts"]
    assert first["status"] == "failed" and first["failed_rank"] == 0 and first["exit_code"] == 3
    assert second["status"] == "succeeded" and second["resumed"] is True
    assert second["note"] == f"resumed from {first_save} (--resume-arg)"
    log = (rd / "logs" / "attempt-1" / "rank-0.log").read_text()
    assert "Loading fine-tuned weights from" in log and first_save in log  # (rich may wrap a long path)
    assert (rd / "adapters" / "adapters.safetensors").is_file() and (rd / "adapters" / "0000010_adapters.safetensors").is_file()
