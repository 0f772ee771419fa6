"""``orch run``'s options become a RunRequest by name, and ``--json`` prints the summary run_job returned.

Unit tests: ``run_job`` is replaced by a fake that records the request, so
nothing starts.
"""

from __future__ import annotations

import argparse
import json

import pytest

from orchestrator import cli
from orchestrator import run as job
from orchestrator.rundir import RankSummary, RunSummary

EVERY_OPTION = [
    "run", "train.py", "--hosts", "a,b", "--include", "a", "--exclude", "b", "-n", "3", "--backend", "ring",
    "--fallback-backend", "ring", "--env", "A=1", "--env", "B=2", "--cwd", "/tmp", "--python", "/usr/bin/python3",
    "--run-dir", "/tmp/r", "--init-timeout", "7", "--hang-timeout", "8", "--first-step-timeout", "9",
    "--max-restarts", "2", "--exclude-failed-host", "--restart-backoff", "0.5", "--grace", "2",
    "--connections-per-ip", "2", "--starting-port", "30000", "--ring-order", "measured", "--quiet", "--json",
    "--bind", "--stdin", "rank0", "--resume-from", "a/*.x", "--resume-arg", "--f {latest}",
    "--ssh-config", "/c", "--known-hosts", "/k", "-i", "/id1", "-i", "/id2", "--ssh-accept-new",
    "--connect-timeout", "4", "--stage", "/s", "--mpirun", "/m", "--mpi-arg=--x",
]


@pytest.fixture(autouse=True)
def _no_prestarted_ranks(monkeypatch):
    """These tests never run ranks: ``-n N`` must not leave pre-started guards in this process's pool."""
    monkeypatch.setenv("ORCH_PRESPAWN", "0")


def _summary(run_dir: str) -> RunSummary:
    return RunSummary(status="succeeded", exit_code=0, failed_rank=None, reason=None, duration_s=1.5,
                      started_at="2026-01-01T00:00:00Z", script="train.py", backend="ring", world_size=1,
                      run_dir=run_dir, ranks=[RankSummary(rank=0, host="localhost")])


def _capture(monkeypatch, tmp_path) -> list:
    seen: list = []

    def fake_run_job(req):
        seen.append(req)
        return _summary(str(tmp_path / "never-written"))

    monkeypatch.setattr(job, "run_job", fake_run_job)
    return seen


def test_every_run_option_reaches_its_request_field(monkeypatch, tmp_path, capsys):
    seen = _capture(monkeypatch, tmp_path)
    own, after = cli._split_script_args(EVERY_OPTION + ["--", "--lr", "3"])
    assert cli._main(own, after) == 0
    (req,) = seen
    expected = dict(
        script="train.py", program="script", script_args=["--lr", "3"], hosts="a,b", include="a", exclude="b", n=3,
        backend="ring", fallback_backend="ring", env=["A=1", "B=2"], cwd="/tmp", python="/usr/bin/python3",
        run_dir="/tmp/r", init_timeout=7.0, hang_timeout=8.0, first_step_timeout=9.0, max_restarts=2,
        exclude_failed_host=True, restart_backoff=0.5, grace=2.0, connections_per_ip=2, starting_port=30000,
        ring_order="measured", echo=False, json_output=True, bind=True, stdin="rank0", resume_from="a/*.x",
        resume_arg="--f {latest}", stage=["/s"], mpirun="/m", mpi_args=["--x"])
    assert {k: getattr(req, k) for k in expected} == expected
    ssh = dict(ssh_config="/c", known_hosts="/k", identity=["/id1", "/id2"], ssh_accept_new=True, connect_timeout=4.0)
    assert {k: getattr(req, k) for k in ssh} == ssh
    capsys.readouterr()


@pytest.mark.parametrize("argv", [EVERY_OPTION, ["run", "train.py"], ["run", "-m", "mlx_lm", "-n", "2"],
                                  ["run", "--hostfile", "h.json", "--", "echo", "hi"]])
def test_the_parsed_request_is_what_validation_gives(monkeypatch, tmp_path, capsys, argv):
    """cmd_run builds the request without validating (model_construct: argparse typed every value);
    validating the same values must change nothing, or the shortcut let a wrong type through."""
    seen = _capture(monkeypatch, tmp_path)
    own, after = cli._split_script_args(argv)
    assert cli._main(own, after) == 0
    (req,) = seen
    fields = {k: getattr(req, k) for k in job.RunRequest.model_fields}
    validated = job.RunRequest.model_validate(fields)
    assert validated.model_dump() == fields
    assert all(type(getattr(validated, k)) is type(v) for k, v in fields.items())
    capsys.readouterr()


def test_no_run_option_is_left_behind():
    """Each dest of `orch run`'s parser is a RunRequest field, or one cmd_run turns into fields itself."""
    parser = cli.build_parser(with_check_options=False)
    run = parser._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
    handled_by_cmd_run = {"script", "module"}  # the program: script / program / script_args
    assert dests - set(job.RunRequest.model_fields) - handled_by_cmd_run == set()


def test_defaults_are_the_requests_defaults(monkeypatch, tmp_path, capsys):
    seen = _capture(monkeypatch, tmp_path)
    assert cli._main(["run", "train.py"], []) == 0
    (req,) = seen
    assert req.echo is True and req.json_output is False and req.env == [] and req.init_timeout == 60.0
    assert capsys.readouterr().out == ""  # no --json: nothing on stdout


def test_json_prints_the_returned_summary_from_memory(monkeypatch, tmp_path, capsys):
    """summary.json was never written here (the fake run_job writes nothing): --json still prints the summary."""
    _capture(monkeypatch, tmp_path)
    assert cli._main(["run", "train.py", "--json"], []) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc["status"] == "succeeded" and doc["run_dir"].endswith("never-written") and doc["duration_s"] == 1.5
    assert not (tmp_path / "never-written").exists()
