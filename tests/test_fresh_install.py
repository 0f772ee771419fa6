"""The README's first command, as a new user runs it: a fresh venv, declared dependencies only.

Why: the first landing imported numpy in the runtime and every recipe without
declaring it, so `pip install -e . && orch run recipes/mlp_regression.py -n 2`
failed on a clean machine while every other test passed (this machine had
numpy from the test extra). This test installs the package into a new venv
with `pip install -e .` (no test extras, no system site-packages) and runs the
exact command the README shows first, read from the README itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.orch_helpers import ROOT

pytestmark = pytest.mark.slow


def readme_first_command() -> str:
    """The first line of the README's first ```bash block (the install-and-run command)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README has no ```bash block"
    return block.group(1).strip().splitlines()[0]


def test_readme_first_command_in_a_fresh_venv(tmp_path):
    cmd = readme_first_command()
    assert cmd.startswith("pip install -e . && orch run "), cmd
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    bin_dir = env_dir / "bin"
    work = tmp_path / "checkout"
    # A copy of the tree (without runs/ and caches): the editable install must not touch the test's own checkout.
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(env_dir)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    cmd = cmd.replace("orch run ", "orch run --run-dir runs/fresh ", 1)
    try:
        p = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=900,
                           start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd!r} did not finish in 900 s: {e.stdout}\n{e.stderr}")
    assert p.returncode == 0, f"{cmd!r} failed with {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    summary = json.loads((work / "runs" / "fresh" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["world_size"] == 2, summary
    assert all(r["steps"] for r in summary["ranks"]), summary["ranks"]
    # Nothing from the test extras leaked in: the venv has only what pyproject declares.
    probe = subprocess.run([str(bin_dir / "python"), "-c", "import importlib.util as u; print(bool(u.find_spec('pytest')))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", "the fresh venv must not have the test extras"
    assert sys.prefix != str(env_dir)
