"""Memory-fit planning (``runtime/memfit.py``): budgets, the predicted peak, refusing, and --fit-memory.

Unit tests of the arithmetic and of reading budgets (fake cgroup files); on
real ranks: a split micro-batch ends exactly where the planned one does, a
refusal is one line on every rank, and, under a real memory cgroup (v1
``memory.limit_in_bytes`` or v2 ``memory.max``, as root), the rank that runs
unplanned is killed by the OOM killer while the planned one finishes with the
parameters of an unconstrained run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from orchestrator.runtime import memfit
from orchestrator.runtime.memfit import Budget, Line, budget, cgroup_memory, decide, fit, probe_sizes, split_pieces
from tests.runtime_helpers import RECIPES, ROOT, latest_checkpoint, launch, load_arrays, max_abs_diff

MLP = RECIPES / "mlp_regression.py"
WRAPPER = ROOT / "tests" / "scripts" / "in_memory_cgroup.py"
MiB = 2**20


# ----------------------------------------------------------------------------- arithmetic


def test_split_pieces_covers_every_sample_once_in_near_equal_parts():
    for n in range(1, 40):
        for pieces in range(1, 12):
            bounds = split_pieces(n, pieces)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [e - s for s, e in bounds]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(bounds) == min(pieces, n)


def test_probe_sizes_stay_well_below_the_planned_batch():
    assert probe_sizes(1024) == (128, 256)
    assert probe_sizes(3) == (1, 1) and probe_sizes(1) == (1, 1)


def test_the_line_predicts_and_inverts():
    line = fit([(128, 20 * MiB), (256, 24 * MiB)], extra=8 * MiB, other_bytes=50 * MiB)
    assert line.per_sample == 4 * MiB / 128
    assert line.mlx_peak(1024) == 16 * MiB + 32 * MiB + 8 * MiB
    assert line.process_peak(1024) == line.mlx_peak(1024) + 50 * MiB
    b = line.largest_batch(100 * MiB)
    assert line.process_peak(b) <= 100 * MiB < line.process_peak(b + 1)
    assert line.largest_batch(70 * MiB) == 0  # not even one sample on top of the fixed part
    flat = fit([(1, 5 * MiB), (1, 5 * MiB)], extra=0, other_bytes=0)
    assert flat.per_sample == 0 and flat.mlx_peak(10**6) == 5 * MiB


def test_decide_fits_refuses_or_splits():
    line = Line(base=10 * MiB, per_sample=0.1 * MiB, extra=0, other_bytes=40 * MiB)  # 1000 samples: 150 MiB
    roomy = decide(line, 1000, Budget(1024 * MiB, "cgroup memory limit"), "mac1", shrink=False)
    assert roomy.fits and roomy.pieces == 1 and roomy.micro_batch == 1000
    tight = Budget(100 * MiB, "hostfile memory_gb")
    refused = decide(line, 1000, tight, "mac1", shrink=False)
    assert not refused.fits
    msg = refused.refusal(3)
    assert "\n" not in msg and msg.startswith("memory: rank 3 on mac1: ") and "150 MiB" in msg and "100 MiB (hostfile memory_gb)" in msg
    assert "--fit-memory" in msg
    split = decide(line, 1000, tight, "mac1", shrink=True)
    # 90 % of 100 MiB less 50 MiB fixed leaves room for 400 samples: 3 pieces of <= 334
    assert split.fits and split.pieces == 3 and split.micro_batch == 334
    assert split.predicted_peak_bytes <= memfit.MARGIN * tight.bytes < split.planned_peak_bytes
    hopeless = decide(line, 1000, Budget(40 * MiB, "cgroup memory limit"), "mac1", shrink=True)
    assert not hopeless.fits and "even one sample per micro-batch does not fit" in hopeless.refusal(0)
    assert "shrink" not in hopeless.event_fields()
    unknown = decide(line, 1000, None, "mac1", shrink=False)
    assert unknown.fits and unknown.budget_bytes is None


# ----------------------------------------------------------------------------- budgets


def test_budget_precedence_hostfile_then_metal_then_cgroup_then_available():
    cg = lambda: (500 * MiB, 300 * MiB)  # noqa: E731 - 300 MiB used, 100 of it ours
    avail = lambda: 8000 * MiB  # noqa: E731
    given = {memfit.BUDGET_ENV: str(2 * 2**30)}
    assert budget(100 * MiB, 16 * 2**30, 2, env=given, cgroup=cg, available=avail) == Budget(2 * 2**30, "hostfile memory_gb")
    assert budget(100 * MiB, 16 * 2**30, 2, env={}, cgroup=cg, available=avail) == Budget(8 * 2**30, "Metal recommended working set")
    assert budget(100 * MiB, None, 2, env={}, cgroup=cg, available=avail) == Budget(300 * MiB, "cgroup memory limit")
    assert budget(100 * MiB, None, 2, env={}, cgroup=lambda: None, available=avail) == Budget(4100 * MiB, "available memory")
    assert budget(100 * MiB, None, 1, env={}, cgroup=lambda: None, available=lambda: None) is None


def test_cgroup_limits_are_read_from_v1_and_v2_and_unlimited_is_none(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text("268435456\n")
    (v2 / "job" / "memory.current").write_text("1000\n")
    (tmp_path / "cg2").write_text("0::/job\n")
    assert cgroup_memory(str(tmp_path / "cg2"), str(v2)) == (268435456, 1000)
    (v2 / "job" / "memory.max").write_text("max\n")
    assert cgroup_memory(str(tmp_path / "cg2"), str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory" / "a" / "b").mkdir(parents=True)
    (v1 / "memory" / "a" / "b" / "memory.limit_in_bytes").write_text("104857600\n")
    (v1 / "memory" / "a" / "b" / "memory.usage_in_bytes").write_text("2000\n")
    (tmp_path / "cg1").write_text("5:cpuacct,cpu:/\n4:memory:/a/b\n0::/\n")
    assert cgroup_memory(str(tmp_path / "cg1"), str(v1)) == (104857600, 2000)
    (v1 / "memory" / "a" / "b" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory(str(tmp_path / "cg1"), str(v1)) is None


# ----------------------------------------------------------------------------- real ranks

BIG = ["--hidden", "1024", "--samples", "8192", "--batch-size", "2048", "--optimizer", "sgd", "--lr", "1e-2",
       "--stats-every", "1"]


def _plan(rank_output) -> dict:
    (plan,) = rank_output.of_kind("memory_plan")
    return plan


ADAM = ["--hidden", "256", "--samples", "8192", "--batch-size", "2048", "--optimizer", "adam", "--lr", "1e-3",
        "--stats-every", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("args", [BIG + ["--steps", "4"], ADAM + ["--steps", "8"]], ids=["sgd", "adam"])
def test_a_split_micro_batch_ends_where_the_planned_one_ends(tmp_path, args):
    (plain,) = launch(MLP, 1, tmp_path / "plain", args, timeout=180)
    p = _plan(plain)
    assert p["pieces"] == 1 and p["fits"] and p["budget_source"] in ("available memory", "cgroup memory limit")
    # A budget that leaves room for about a third of the batch: the rank splits it and accumulates.
    room = p["planned_peak_bytes"] - 0.6 * p["per_sample_bytes"] * p["batch"]  # +-40 % of the activations of slack
    env = {memfit.BUDGET_ENV: str(int(room / memfit.MARGIN))}
    (split,) = launch(MLP, 1, tmp_path / "split", args + ["--fit-memory"], timeout=180, extra_env=env)
    s = _plan(split)
    assert s["fits"] and s["pieces"] >= 2 and s["budget_source"] == "hostfile memory_gb"
    assert s["predicted_peak_bytes"] < p["predicted_peak_bytes"]
    assert "--fit-memory: rank 0" in split.text
    a, b = load_arrays(latest_checkpoint(tmp_path / "plain")), load_arrays(latest_checkpoint(tmp_path / "split"))
    assert max_abs_diff(a, b) < 1e-5 and max_abs_diff(a, b, prefix="optimizer.") < 1e-5
    # What was measured stays close to what was predicted (the prediction errs on the safe side).
    measured = max(e["mlx_peak_bytes"] for e in split.of_kind("memory"))
    assert measured <= s["predicted_mlx_peak_bytes"]


@pytest.mark.slow
def test_a_batch_over_budget_is_refused_in_one_line_on_every_rank(tmp_path):
    results = launch(MLP, 2, tmp_path / "run", BIG + ["--steps", "3"], timeout=120, check=False,
                     extra_env={memfit.BUDGET_ENV: str(120 * MiB)})
    assert all(r.returncode == 1 for r in results), [r.returncode for r in results]
    for r in results:
        assert "Traceback" not in r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert re.fullmatch(r"orch: memory: rank \d+ on \S+: predicted peak [\d.]+ \w+ at batch 2048 > budget 120 MiB "
                            r"\(hostfile memory_gb\); .*--fit-memory.*", line), line
        assert not r.of_kind("step")


def _memory_cgroup(limit: int) -> Path:
    for base, files in ((Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes",)),
                        (Path("/sys/fs/cgroup"), ("memory.max",))):
        if (base / files[0]).exists() or (base / "cgroup.controllers").exists() and "memory" in (
                base / "cgroup.controllers").read_text():
            path = base / f"orch-test-memfit-{os.getpid()}-{time.monotonic_ns()}"
            path.mkdir()
            (path / files[0]).write_text(str(limit))
            return path
    pytest.skip("no writable memory cgroup (needs root and cgroup v1 memory or v2 with the memory controller)")


def _remove_cgroup(path: Path) -> None:
    deadline = time.monotonic() + 10
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            assert time.monotonic() < deadline, f"could not remove {path}: {(path / 'cgroup.procs').read_text()}"
            time.sleep(0.1)


@pytest.mark.slow
def test_under_a_memory_limit_the_unplanned_rank_is_oom_killed_and_the_planned_one_ends_like_an_unlimited_run(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for a memory cgroup")
    args = BIG + ["--steps", "2", "--batch-size", "4096", "--samples", "16384"]
    # Unconstrained, 2 ranks: where the run must end, and how much memory a rank needs.
    launch(MLP, 2, tmp_path / "free", args, timeout=240)
    free = load_arrays(latest_checkpoint(tmp_path / "free"))
    cg = _memory_cgroup(1)  # a placeholder limit, set below once the numbers are known
    try:
        probe = launch(MLP, 1, tmp_path / "probe", args + ["--steps", "1"], timeout=120)[0]
        p = _plan(probe)
        fixed = p["planned_peak_bytes"] - p["per_sample_bytes"] * 4096
        # Room for the fixed part and about 40 % of rank 1's samples: the unplanned step cannot fit.
        limit = int(fixed + 0.4 * p["per_sample_bytes"] * 4096)
        (cg / ("memory.limit_in_bytes" if (cg / "memory.limit_in_bytes").exists() else "memory.max")).write_text(str(limit))
        env = {"ORCH_TEST_MEMCG": f"1:{cg}"}
        with pytest.raises(AssertionError, match=r"rank 1 rc=-9"):  # SIGKILL: the OOM killer
            launch(WRAPPER, 2, tmp_path / "unplanned", [str(MLP)] + args + ["--no-memory-check"], timeout=240,
                   extra_env=env)
        ranks = launch(WRAPPER, 2, tmp_path / "planned", [str(MLP)] + args + ["--fit-memory"], timeout=300,
                       extra_env=env)
    finally:
        _remove_cgroup(cg)
    p0, p1 = _plan(ranks[0]), _plan(ranks[1])
    assert p0["pieces"] == 1 and p1["pieces"] >= 2 and p1["budget_source"] == "cgroup memory limit"
    planned = load_arrays(latest_checkpoint(tmp_path / "planned"))
    assert max_abs_diff(free, planned) < 1e-5
    rss = max(e["rss_bytes"] for e in ranks[1].of_kind("memory"))
    assert rss <= limit
    json.dumps(p1)  # the event is plain JSON (it goes into summary.json)


# ----------------------------------------------------------------------------- the hostfile's memory_gb


def test_hostfile_memory_gb_becomes_each_ranks_budget_and_bad_values_are_one_line():
    from orchestrator.hostfile import ConfigError, parse_hostfile

    h = parse_hostfile({"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"], "memory_gb": 16, "slots": 2},
                                  {"ssh": "mac2", "ips": ["10.0.0.2"]}]})
    assert h.hosts[0].env == {memfit.BUDGET_ENV: str(8 * 2**30)} and h.hosts[1].env == {}
    with pytest.raises(ConfigError, match=r"^hosts.json: hosts\[0\].memory_gb: memory_gb is -1.0; give the memory"):
        parse_hostfile({"hosts": [{"ssh": "mac1", "memory_gb": -1}]}, "hosts.json")
    with pytest.raises(ConfigError, match=r"known host fields are .*memory_gb"):
        parse_hostfile({"hosts": [{"ssh": "mac1", "memroy_gb": 4}]}, "hosts.json")


@pytest.mark.slow
def test_orch_run_with_a_small_memory_gb_refuses_before_the_first_step_and_names_the_host(tmp_path):
    from tests.orch_helpers import run_orch, summary

    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"], "slots": 2, "memory_gb": 0.1}]}))
    run_dir = tmp_path / "run"
    r = run_orch("run", str(MLP), "--hostfile", str(hosts), "--run-dir", str(run_dir), "--",
                 *BIG, "--steps", "3", cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr
    assert re.search(r"memory: rank \d+ on \S+: predicted peak [\d.]+ MiB at batch 2048 > budget 51 MiB "
                     r"\(hostfile memory_gb\)", r.stderr), r.stderr
    s = summary(run_dir)
    plans = [rank["memory_plan"] for rank in s["ranks"]]
    assert all(p and not p["fits"] and p["budget_bytes"] == int(0.1 * 2**30 / 2) for p in plans)
    assert all(rank["steps"] is None for rank in s["ranks"])


@pytest.mark.slow
def test_orch_run_fits_a_small_host_and_the_report_draws_predicted_against_measured(tmp_path):
    pytest.importorskip("matplotlib")
    from orchestrator import report
    from tests.orch_helpers import run_orch, summary

    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"], "slots": 2, "memory_gb": 0.35}]}))
    run_dir = tmp_path / "run"
    r = run_orch("run", str(MLP), "--hostfile", str(hosts), "--run-dir", str(run_dir), "--",
                 *BIG, "--batch-size", "4096", "--samples", "16384", "--steps", "3", "--fit-memory",
                 cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr
    for rank in summary(run_dir)["ranks"]:
        p, m = rank["memory_plan"], rank["memory"]
        assert p["fits"] and p["pieces"] >= 2 and p["budget_source"] == "hostfile memory_gb"
        assert m["rss_peak_bytes"] <= p["budget_bytes"]  # the plan held
    text = report.format_summary(report.load_run(run_dir))
    assert "memory plan (predicted before the first step) vs measured:" in text and "(hostfile memory_gb)" in text
    page = report.write_report(run_dir).read_text()
    assert "<h2>Memory plan: predicted vs measured peak</h2>" in page
    assert (run_dir / "report" / "memory_plan.png").stat().st_size > 1000
    assert "Memory plan: budget, predicted and measured peak per rank" in page


@pytest.mark.slow
def test_a_rebalance_that_grows_a_ranks_share_splits_it_to_fit_and_the_result_stays_exact(tmp_path):
    """--balance speed + --fit-memory: the budget fits the equal share but not the larger one balancing gives."""
    from orchestrator.runtime.balance import TEST_SPEEDS_ENV

    args = ["--hidden", "1024", "--samples", "2048", "--optimizer", "sgd", "--lr", "1e-2", "--stats-every", "0",
            "--steps", "6"]
    (one,) = launch(MLP, 1, tmp_path / "one", args + ["--batch-size", "1024"], timeout=240)
    two = args + ["--batch-size", "512", "--balance", "speed", "--balance-every", "100", "--fit-memory"]
    # The same 2-rank run with room to spare: each rank's fixed part and bytes per sample at its start share.
    roomy = launch(MLP, 2, tmp_path / "roomy", two, timeout=300,
                   extra_env={TEST_SPEEDS_ENV: "1,3@0", memfit.BUDGET_ENV: str(2**40)})
    e = _plan(roomy[1])
    fixed = e["planned_peak_bytes"] - e["per_sample_bytes"] * e["batch"]
    budget = int((fixed + e["per_sample_bytes"] * 640) / memfit.MARGIN)  # 512 fits, 768 does not (+-128 samples)
    ranks = launch(MLP, 2, tmp_path / "two", two, timeout=300,
                   extra_env={TEST_SPEEDS_ENV: "1,3@0", memfit.BUDGET_ENV: str(budget)})
    assert all(_plan(r)["pieces"] == 1 for r in ranks)  # the equal start fits
    assert [(x["step"], x["shares"]) for x in ranks[1].of_kind("rebalance")] == [(0, [512, 512]), (4, [256, 768])]
    assert "--fit-memory: rank 1" in ranks[1].text and "its 768 samples per micro-batch as 2 pieces" in ranks[1].text
    assert "--fit-memory" not in ranks[0].text
    a, b = load_arrays(latest_checkpoint(tmp_path / "one")), load_arrays(latest_checkpoint(tmp_path / "two"))
    assert max_abs_diff(a, b) < 1e-5
    assert max_abs_diff(a, load_arrays(latest_checkpoint(tmp_path / "roomy"))) < 1e-5
