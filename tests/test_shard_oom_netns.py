"""``--shard auto`` on hosts whose memory cannot hold data parallelism: it shards, and trains to the end.

Four network-namespace hosts with their own sshd (``tests/netns.py``), each given 640 MiB of "RAM": a memory
cgroup the host's sshd, and so the guard and the rank it starts, lives under (``tests/memcg.py``: the limit
is on the parent of sshd's cgroup, as a systemd slice's ``MemoryMax`` is, and the cgroup tree is mounted
in the host so the rank reads it itself; no hostfile ``memory_gb``). The model is the 118 MB MLP of
``benchmarks/shard_memory.py`` (``bench_mlp`` 2048x8, Adam at lr 1e-4), 2 steps at 4 ranks:

* data parallelism needs ~950 MiB per rank (MLX peak 821 MiB). The kernel OOM-kills a rank already while
  rank 0's weights and Adam state are broadcast at the start (the whole model and its state, 354 MB, plus
  the broadcast's buffers), before the memory check's probes could refuse it; orch names the rank killed
  by SIGKILL (it cannot tell the OOM killer from another SIGKILL: the test reads the cgroup's counter).
* ``--shard auto`` under the same cgroups picks ``full`` (predicted MLX peak per rank before
  activations: none 788, optimizer 563, full 261 MiB against ~540 MiB the tightest rank has for MLX),
  says why, trains both steps and ends with the parameters of data parallelism on unconstrained hosts.

Why 640 MiB: ``--shard full``'s process peak here is ~600 MiB (the whole model is built, and synced
from rank 0, before it is sharded), and ``--shard auto`` would pick ``optimizer`` once a rank has about
563 MiB for MLX beside its ~90 MiB of interpreter and libraries (a cgroup of ~670 MiB). The window is
narrow because the prediction undercounts the process: with the runtime's default ``keep_freed_memory``
(``runtime/allocator.py``: glibc keeps freed blocks up to 32 MiB in the heap) a rank's resident memory
grows past MLX's peak, ZeRO-1's to 850-880 MiB (MLX peak 611-627; 592-603 MiB with
``--no-keep-freed-memory``). So with 670-880 MiB per host ``--shard auto`` picks ``optimizer`` and a rank
can be OOM-killed; that is not what this test pins down.

Why lr 1e-4: Adam's first steps are about ``lr * sign(g)``, and many gradients of this deep MLP are ~1e-8,
Adam's eps, where the last-bit difference between a reduce-scatter and an all-reduce of the same sum
changes the step by up to a third of ``lr`` (at 1e-3 a handful of the 29.5 M weights ended 2.8e-4 apart).
At 1e-4 two steps move a weight ~2e-4, so a sharded run that did not train would still fail the 1e-4.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.runtime.memfit import cgroup_memory
from tests.memcg import host_memory_limits, oom_kills
from tests.netns import netns_cluster  # noqa: F401 (fixture)
from tests.orch_helpers import ROOT, events, ring_hostfile, run_orch, summary
from tests.runtime_helpers import latest_checkpoint, load_arrays, max_abs_diff

BENCH = ROOT / "benchmarks" / "bench_mlp.py"
ARGS = ["--hidden", "2048", "--depth", "8", "--batch-size", "16", "--steps", "2", "--stats-every", "1",
        "--optimizer", "adam", "--lr", "1e-4"]
MiB = 2**20
HOST_MEMORY = 640 * MiB


def _orch(c, tmp_path: Path, name: str, extra: list[str]):
    run_dir = tmp_path / name
    r = run_orch("run", str(BENCH), "--hostfile", str(ring_hostfile(c, tmp_path / "hosts.json")),
                 "--ssh-config", c.ssh_config_path, "--known-hosts", c.known_hosts_path, "--run-dir", str(run_dir),
                 "--", *ARGS, *extra, cwd=tmp_path, timeout=180)
    return r, run_dir


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(600)  # three bounded runs of up to 180 s each under load; ~90 s when the box is idle
def test_under_host_memory_that_kills_data_parallelism_shard_auto_shards_and_ends_like_it(netns_cluster, tmp_path):  # noqa: F811
    c = netns_cluster(4)
    r, free = _orch(c, tmp_path, "free", [])  # unconstrained data parallelism: where the run must end
    assert r.returncode == 0, r.stderr[-3000:]

    with host_memory_limits(c, HOST_MEMORY) as cgroups:
        r, dp_run = _orch(c, tmp_path, "dp", [])
        s = summary(dp_run)
        assert r.returncode == 128 + 9 and s["status"] == "failed", r.stderr[-3000:]
        killed = s["failed_rank"]
        assert s["ranks"][killed]["signal"] == 9 and f"rank {killed} (host{killed}) was killed by SIGKILL" in r.stderr
        assert oom_kills(cgroups[killed]) >= 1  # the kernel's OOM killer, not anything of ours
        # Killed while rank 0's weights and Adam state were broadcast, before the memory check could refuse.
        assert not any(x["steps"] for x in s["ranks"]) and not [e for e in events(dp_run) if e["kind"] == "memory_plan"]

        r, auto = _orch(c, tmp_path, "auto", ["--shard", "auto"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    said = re.search(r"--shard auto: (\w+) \((.*)\)", r.stdout)
    assert said and said.group(1) == "full", r.stdout[-3000:]
    assert "the least sharding that fits the tightest rank's" in said.group(2) and "none 788.0 MiB" in said.group(2)
    s = summary(auto)
    assert all(x["steps"] == 2 for x in s["ranks"])
    assert all(x["memory_plan"]["budget_source"] == "cgroup memory limit" for x in s["ranks"])
    dp, sharded = load_arrays(latest_checkpoint(free)), load_arrays(latest_checkpoint(auto))
    assert max_abs_diff(dp, sharded) < 1e-4 and max_abs_diff(dp, sharded, prefix="optimizer.") < 1e-4


def test_the_memory_limit_is_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path):
    """A rank under sshd's session cgroup, the limit on a parent above it (a slice's MemoryMax): the parent's."""
    v1 = tmp_path / "v1" / "memory"
    for d, limit, usage in (("", 2**63 - 4096, 10**9), ("host", 640 * MiB, 200 * MiB), ("host/sshd", None, 150 * MiB)):
        (v1 / d).mkdir(parents=True, exist_ok=True)
        (v1 / d / "memory.limit_in_bytes").write_text(str(limit or 9223372036854771712))
        (v1 / d / "memory.usage_in_bytes").write_text(str(usage))
    (tmp_path / "cg1").write_text("4:memory:/host/sshd\n0::/\n")
    assert cgroup_memory(str(tmp_path / "cg1"), str(tmp_path / "v1")) == (640 * MiB, 200 * MiB)
    (v1 / "host" / "sshd" / "memory.limit_in_bytes").write_text(str(500 * MiB))  # less room below: that one
    assert cgroup_memory(str(tmp_path / "cg1"), str(tmp_path / "v1")) == (500 * MiB, 150 * MiB)
    v2 = tmp_path / "v2"
    (v2 / "user.slice" / "session-3.scope").mkdir(parents=True)
    (v2 / "user.slice" / "memory.max").write_text(f"{MiB * 800}\n")
    (v2 / "user.slice" / "memory.current").write_text("1000\n")
    (v2 / "user.slice" / "session-3.scope" / "memory.max").write_text("max\n")
    (tmp_path / "cg2").write_text("0::/user.slice/session-3.scope\n")
    assert cgroup_memory(str(tmp_path / "cg2"), str(v2)) == (800 * MiB, 1000)
