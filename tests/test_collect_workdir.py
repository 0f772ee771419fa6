"""A remote rank 0's working directory comes home: what it wrote there lands in RUN/workdir/.

Real sshd in network namespaces, the real ``orch`` command. mlx-lm writes
``adapters/`` relative to its working directory; on a remote host that is the
staged copy of the script's directory, which used to be retired with the run.
Only what the program wrote comes home (not the staged files), only rank 0's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.netns import make_cluster_fixture
from tests.orch_helpers import SCRIPTS, run_orch

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(180)]

c2w = make_cluster_fixture(2, scope="module", name="c2w")


def test_files_rank0_writes_in_its_remote_working_directory_come_home(c2w, tmp_path):
    c = c2w
    hosts = [{"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c.hosts]
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    rd = tmp_path / "run"
    r = run_orch("run", str(SCRIPTS / "write_workdir.py"), "--hostfile", str(hf), "--ssh-config", c.ssh_config_path,
                 "--known-hosts", str(c.known_hosts_path), "--python", sys.executable, "--run-dir", str(rd),
                 cwd=tmp_path, timeout=150)
    assert r.returncode == 0, r.stderr
    wd = rd / "workdir"
    got = sorted(str(p.relative_to(wd)) for p in wd.rglob("*") if p.is_file())
    assert got == ["adapters/0000001_adapters.safetensors", "notes.txt"]  # rank 0's, nothing staged
    assert (wd / "adapters" / "0000001_adapters.safetensors").read_bytes() == b"weights of rank 0\n" * 100
    assert (wd / "notes.txt").read_text() == "rank 0 was here\n"
    stats = json.loads((rd / "staging.json").read_text())["collected"]
    assert not stats["errors"] and stats["files"] >= 2
