"""A rank's traceback starts at the program's own first frame: orch's bootstrap and runpy stay out.

Users read these in the rank log and in the failure's last lines; five frames of
``orchestrator/runtime/bootstrap.py`` and ``<frozen runpy>`` above their code told them nothing.
Every form of program (a script, a module, under mpirun) goes through the same hook.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.orch_helpers import run_orch

BOOM = textwrap.dedent("""\
    def inner():
        raise ValueError("boom in the user's code")

    def outer():
        inner()

    outer()
""")


def assert_user_frames_only(log: str, file_name: str) -> None:
    tb = log[log.index("Traceback (most recent call last):"):]
    assert "ValueError: boom in the user's code" in tb, tb
    frames = [line.strip() for line in tb.splitlines() if line.strip().startswith("File ")]
    assert frames and frames[0].startswith(f'File "') and file_name in frames[0], frames
    assert [f for f in frames if "in inner" in f or "in outer" in f], frames
    assert not [f for f in frames if "bootstrap.py" in f or "runpy" in f], frames


def test_a_script_traceback_has_only_the_scripts_frames(tmp_path):
    (tmp_path / "boom.py").write_text(BOOM)
    rd = tmp_path / "run"
    r = run_orch("run", "boom.py", "-n", "1", "--run-dir", str(rd), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert_user_frames_only((rd / "logs" / "rank-0.log").read_text(), "boom.py")
    assert_user_frames_only(r.stderr, "boom.py")  # the failure's last lines, as the user sees them


def test_a_module_traceback_has_only_the_modules_frames(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(BOOM)
    rd = tmp_path / "run"
    r = run_orch("run", "-m", "pkg", "-n", "1", "--run-dir", str(rd), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert_user_frames_only((rd / "logs" / "rank-0.log").read_text(), "__main__.py")


@pytest.mark.slow
def test_under_mpirun_too(tmp_path):
    (tmp_path / "boom.py").write_text("import mlx.core as mx\nmx.distributed.init()\n" + BOOM)
    rd = tmp_path / "run"
    r = run_orch("run", "boom.py", "-n", "2", "--backend", "mpi", "--run-dir", str(rd), cwd=tmp_path, timeout=90)
    assert r.returncode == 1, r.stderr
    assert_user_frames_only((rd / "logs" / "rank-0.log").read_text(), "boom.py")


def test_a_python_without_mlx_shows_the_programs_import_not_orchs(tmp_path):
    """``-n`` ranks are started before the plan and import MLX early (launch/prespawn.py; over SSH, each host's
    as soon as it is staged). Where MLX is missing, that early import must not fail in orch's own frames: the
    program's import fails instead, with the program's frame and the missing-module diagnosis."""
    shadow = tmp_path / "shadow"
    (shadow / "mlx").mkdir(parents=True)
    (shadow / "mlx" / "__init__.py").write_text("")  # an `mlx` without `mlx.core`, first on the path
    (tmp_path / "needs_mlx.py").write_text("import mlx.core as mx\nprint(mx.array(1))\n")
    rd = tmp_path / "run"
    r = run_orch("run", "needs_mlx.py", "-n", "1", "--run-dir", str(rd), cwd=tmp_path,
                 env={"PYTHONPATH": str(shadow)})
    assert r.returncode == 1, r.stderr
    log = (rd / "logs" / "rank-0.log").read_text()
    assert "ModuleNotFoundError: No module named 'mlx.core'" in log, log
    frames = [line.strip() for line in log.splitlines() if line.strip().startswith("File ")]
    assert frames and "needs_mlx.py" in frames[0] and not [f for f in frames if "orchestrator" in f], frames
    assert "has no module 'mlx.core'" in r.stderr, r.stderr
