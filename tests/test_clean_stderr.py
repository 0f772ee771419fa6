"""Users see only orch's own words: every ``orch`` command path, with the dependencies installed here.

Why: a fresh machine got cryptography 51, whose DSA deprecation makes ``import asyncssh``
print ten lines of warnings before every ``orch check``, ``orch env`` and SSH ``orch run``,
and before the one-line error a bad hostfile gets. This machine's older cryptography never
showed it. Each command here runs as a user runs it (a subprocess, the default warning
filters: no PYTHONWARNINGS) and its stderr is read line by line: no line that a third party
wrote (a ``SomethingWarning:``, a ``file.py:NN:`` source location, a traceback), and where orch
promises one line, exactly one.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest

from tests.netns import make_cluster_fixture
from tests.orch_helpers import RECIPES, finish, orch_argv, ring_hostfile
from tests.test_hostfile_gen import MBP, NS, STUDIO, save

FOREIGN = re.compile(r"\b\w+(Warning|Error|Exception):|\.py:\d+|site-packages|^Traceback|^\s+File \"|warnings\.warn")


def orch(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``orch ARGS`` as a user runs it: the default warning filters (no PYTHONWARNINGS, no dev mode)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONDEVMODE")}
    return finish(subprocess.Popen(orch_argv(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True), timeout)


def assert_only_orch(p: subprocess.CompletedProcess, what: str) -> None:
    foreign = [line for line in p.stderr.splitlines() if FOREIGN.search(line)]
    assert not foreign, f"{what}: lines orch did not write reached stderr:\n" + "\n".join(foreign)


def assert_one_line(p: subprocess.CompletedProcess, what: str, program: str = "orch") -> str:
    assert p.returncode == 2, (what, p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: "), f"{what}: {p.stderr!r}"
    assert "orch orch" not in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- unit: the filter is narrow


def test_the_filter_is_this_category_from_asyncssh_only():
    from cryptography.utils import CryptographyDeprecationWarning

    from orchestrator.remote import ssh

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ssh._quiet_known_warnings()
        for module in ("asyncssh.crypto.misc", "asyncssh"):
            warnings.warn_explicit("DSA is deprecated", CryptographyDeprecationWarning, "misc.py", 32, module=module)
        warnings.warn_explicit("DSA is deprecated", CryptographyDeprecationWarning, "x.py", 1, module="paramiko.dsskey")
        warnings.warn_explicit("something else", DeprecationWarning, "misc.py", 3, module="asyncssh.crypto.misc")
    assert [(w.category.__name__, str(w.message)) for w in seen] == [
        ("CryptographyDeprecationWarning", "DSA is deprecated"), ("DeprecationWarning", "something else")]


# ----------------------------------------------------------------------------- local command paths


def test_local_commands_print_only_orch_lines(tmp_path):
    run_dir = tmp_path / "run"
    p = orch("run", str(RECIPES / "mlp_regression.py"), "-n", "2", "--run-dir", str(run_dir), "--", "--steps", "3",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert_only_orch(p, "orch run -n 2")
    assert all(l.startswith("orch: ") or re.match(r"^(\[\d+\] |\s*(rank\s+host|\d+\s+\S+))", l)
               for l in p.stderr.splitlines()), p.stderr  # orch's lines, the end table, ranks' own stderr ([r])

    for args in (("report", str(run_dir)), ("runs", str(tmp_path)), ("env",), ("env", "--json"), ("--version",)):
        p = orch(*args, cwd=tmp_path)
        assert p.returncode == 0, (args, p.stderr)
        assert_only_orch(p, f"orch {' '.join(args)}")

    saved = tmp_path / "saved"
    save(saved, {"mbp": (MBP.read_text(), NS.read_text()), "studio": (STUDIO.read_text(), NS.read_text())})
    p = orch("hostfile", "--hosts", "mbp,studio", "--over", "thunderbolt", "--from-dir", str(saved),
             "-o", str(tmp_path / "tb.json"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert_only_orch(p, "orch hostfile")


def test_errors_are_one_line_naming_the_program_once(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    for args in (("check", "--hostfile", str(bad)), ("env", "--hostfile", str(bad)),
                 ("run", "x.py", "--hostfile", str(bad))):
        line = assert_one_line(orch(*args, cwd=tmp_path), " ".join(args[:1]))
        assert "bad.json" in line, line
    cases = {("nosuchcommand",): "(see 'orch --help')", ("stage",): "(see 'orch stage --help')",
             ("run", "--hang-timout", "3", "x.py"): "(see 'orch run --help')",
             ("check", "--bogus"): "(see 'orch check --help')", ("env", "--bogus"): "(see 'orch env --help')",
             ("report",): "(see 'orch report --help')", ("runs", "--limit", "x"): "(see 'orch runs --help')",
             ("hostfile",): "(see 'orch hostfile --help')"}
    for args, tail in cases.items():
        line = assert_one_line(orch(*args, cwd=tmp_path), " ".join(args))
        assert line.endswith(tail), (args, line)


# ----------------------------------------------------------------------------- over SSH (real sshd in namespaces)


c2 = make_cluster_fixture(2, scope="module", name="c2")


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ssh_commands_print_only_orch_lines(c2, tmp_path):
    hostfile = ring_hostfile(c2, tmp_path / "hosts.json")
    ssh = ["--ssh-config", c2.ssh_config_path, "--known-hosts", c2.known_hosts_path]
    p = orch("run", str(RECIPES / "mlp_regression.py"), "--hostfile", str(hostfile), *ssh,
             "--run-dir", str(tmp_path / "run"), "--", "--steps", "3", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert_only_orch(p, "orch run over SSH")
    p = orch("check", "--hostfile", str(hostfile), *ssh, "--timeout", "20", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_only_orch(p, "orch check")
    p = orch("env", "--hostfile", str(hostfile), *ssh, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_only_orch(p, "orch env --hostfile")
