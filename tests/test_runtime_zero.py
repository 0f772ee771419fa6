"""``--shard-optimizer`` (ZeRO-1): slicing, equivalence with plain data parallelism, resume across world sizes.

Integration tests run real ranks on MLX's ring backend (``tests.runtime_helpers.launch``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from orchestrator.runtime.zero import ShardedOptimizer, layout
from tests.runtime_helpers import RECIPES, latest_checkpoint, launch, load_arrays, max_abs_diff

MLP = RECIPES / "mlp_regression.py"
SMALL = ["--samples", "512", "--hidden", "16", "--stats-every", "0"]


def params():
    rng = np.random.default_rng(1)
    return [("b.weight", mx.array(rng.standard_normal((5, 3), dtype=np.float32))),
            ("a.bias", mx.array(rng.standard_normal((7,), dtype=np.float32))),
            ("c.scale", mx.array(rng.standard_normal((2, 2), dtype=np.float32)).astype(mx.bfloat16))]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 40])
def test_the_slices_of_all_ranks_are_the_flattened_parameters_plus_padding(world):
    named = params()
    arrays = dict(named)
    groups = layout(named, world)
    assert sorted(groups) == ["bfloat16", "float32"]
    f32 = groups["float32"]
    assert [p.key for p in f32.pieces] == ["a.bias", "b.weight"] and f32.total == 22
    for g in groups.values():
        slices = [g.slice(arrays, r) for r in range(world)]
        assert all(s.shape == (g.shard,) and s.dtype == g.dtype for s in slices)
        joined = mx.concatenate(slices)
        assert g.shard == -(-g.total // world)  # ceil: at most world - 1 padding elements
        assert np.array_equal(np.array(joined[:g.total].astype(mx.float32)),
                              np.array(g.full(arrays).astype(mx.float32)))
        assert not np.array(joined[g.total:].astype(mx.float32)).any()  # padding is zeros
        for key, back in g.split(joined):  # and the gathered vector rebuilds every parameter
            assert back.shape == arrays[key].shape and mx.array_equal(back, arrays[key]).item()


def test_an_optimizer_that_is_not_elementwise_is_refused_with_the_fix():
    model = nn.Linear(4, 4)
    with pytest.raises(SystemExit) as exc:
        ShardedOptimizer(optim.Adafactor(learning_rate=1e-2), model, mx.distributed.init())
    assert "--shard-optimizer: Adafactor" in str(exc.value) and "drop --shard-optimizer" in str(exc.value)


def test_one_rank_sharded_adam_steps_like_the_plain_optimizer():
    """world 1: the flat-slice update is the plain per-parameter update, and the gathered state its state."""
    mx.random.seed(3)
    plain, sharded_model = nn.Linear(6, 5), nn.Linear(6, 5)
    sharded_model.update(plain.parameters())
    opt = optim.Adam(learning_rate=1e-2)
    sharded = ShardedOptimizer(optim.Adam(learning_rate=1e-2), sharded_model, mx.distributed.init())
    for step in range(5):
        grads = {"weight": mx.random.normal((5, 6)), "bias": mx.random.normal((5,))}
        opt.update(plain, grads)
        sharded.update(sharded_model, grads)
        mx.eval(plain.parameters(), opt.state, sharded_model.parameters(), sharded.state)
    for (k, a), (_, b) in zip(tree_flatten(plain.parameters()), tree_flatten(sharded_model.parameters())):
        assert mx.array_equal(a, b).item(), k
    full = sharded.gather_state()
    assert sorted(full) == sorted(k for k, _ in tree_flatten(opt.state))
    for k, a in tree_flatten(opt.state):
        assert mx.array_equal(a, full[k]).item(), k


# ----------------------------------------------------------------------------- real ranks


def train(tmp_path, name, n, args, timeout=120):
    ranks = launch(MLP, n, tmp_path / name, SMALL + args, timeout=timeout)
    return load_arrays(latest_checkpoint(tmp_path / name)), ranks


def state_bytes(ranks) -> list[int]:
    return [r.of_kind("metric")[-1]["values"]["optimizer_state_bytes"] for r in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_two_sharded_ranks_train_exactly_like_plain_data_parallel(tmp_path, optimizer):
    common = ["--steps", "20", "--optimizer", optimizer, "--lr", "1e-2", "--batch-size", "8"]
    plain, plain_ranks = train(tmp_path, "plain", 2, common)
    sharded, sharded_ranks = train(tmp_path, "sharded", 2, common + ["--shard-optimizer"])
    assert max_abs_diff(plain, sharded) <= 1e-6
    assert max_abs_diff(plain, sharded, prefix="optimizer.") <= 1e-6  # the checkpoint holds the full state
    init, _ = train(tmp_path, "init", 1, ["--steps", "0"])
    assert max_abs_diff(plain, init) > 1e-2  # the parameters did move
    assert [e["loss"] for e in plain_ranks[0].of_kind("step")] == [e["loss"] for e in sharded_ranks[1].of_kind("step")]
    # Each rank holds about half of the per-parameter state (step/learning_rate and padding on top).
    full, halves = state_bytes(plain_ranks), state_bytes(sharded_ranks)
    assert full[0] == full[1] and halves[0] == halves[1]
    per_param = sum(v.nbytes for k, v in plain.items() if k.startswith("optimizer.") and k.count(".") > 1)
    assert per_param > 0 and halves[0] <= full[0] - per_param // 2 + 8
    # What it costs on the wire: the all_gather of the updated parameters, (N-1)/N of them, per step.
    (plain_m, sharded_m) = (r[0].of_kind("metric")[-1]["values"] for r in (plain_ranks, sharded_ranks))
    param_bytes = sum(v.nbytes for k, v in plain.items() if k.startswith("model."))
    assert sharded_m["bytes_sent_per_step"] == plain_m["bytes_sent_per_step"] + param_bytes // 2


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path, first, then):
    """N ranks x batch b == 1 rank x batch N*b, so a run may change world size at a checkpoint."""
    common = ["--optimizer", "adam", "--lr", "1e-2", "--shard-optimizer"]
    batch = {1: ["--batch-size", "16"], 2: ["--batch-size", "8"]}
    straight, _ = train(tmp_path, "straight", first, common + batch[first] + ["--steps", "20"])
    train(tmp_path, "switched", first, common + batch[first] + ["--steps", "10"])
    resumed, ranks = train(tmp_path, "switched", then, common + batch[then] + ["--steps", "20", "--resume"])
    assert "resumed from" in ranks[0].text and all(r.of_kind("step")[0]["step"] == 11 for r in ranks)
    assert max_abs_diff(straight, resumed) < 1e-5
    assert max_abs_diff(straight, resumed, prefix="optimizer.") < 1e-5
    # A plain (unsharded) run resumes from the same checkpoint format.
    plain, _ = train(tmp_path, "switched", then, ["--optimizer", "adam", "--lr", "1e-2"] + batch[then]
                     + ["--steps", "25", "--resume"])
    assert max_abs_diff(resumed, plain, prefix="optimizer.") > 0  # five more steps happened


@pytest.mark.slow
def test_a_checkpoint_whose_optimizer_state_does_not_fit_stops_every_rank(tmp_path):
    train(tmp_path, "run", 1, ["--steps", "3", "--optimizer", "sgd"])
    results = launch(MLP, 2, tmp_path / "run", SMALL + ["--steps", "6", "--optimizer", "adam", "--shard-optimizer",
                                                         "--resume"], timeout=60, check=False)
    assert all(r.returncode not in (0, None) for r in results)
    assert "optimizer state does not fit" in results[0].stderr and ".m" in results[0].stderr
    assert "other rank(s) failed to start" in results[1].stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_four_sharded_ranks_of_a_large_model_agree_on_every_step(tmp_path):
    """Regression: at 4 ranks on a 118 MB model the collectives of one lazy step (the gradient all-reduce,
    each group's all_gather) ran in another order on each rank, and the ring mixed their bytes: the
    averaged loss differed per rank and turned nan. Every rank must report the same finite loss, and the
    first one must be data parallelism's."""
    import json

    from tests.orch_helpers import ROOT, run_orch

    bench = ROOT / "benchmarks" / "bench_mlp.py"
    args = ["--", "--hidden", "2048", "--depth", "8", "--batch-size", "16", "--steps", "2"]
    losses = {}
    for arm, extra in (("dp", []), ("zero", ["--shard-optimizer"])):
        rd = tmp_path / arm
        r = run_orch("run", str(bench), "-n", "4", "--run-dir", str(rd), *args, *extra, cwd=tmp_path, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        steps = [json.loads(line) for line in (rd / "events.jsonl").read_text().splitlines() if '"kind":"step"' in line]
        by_step: dict = {}
        for e in steps:
            by_step.setdefault(e["step"], set()).add(e["loss"])
        assert all(len(v) == 1 for v in by_step.values()), by_step  # every rank the same averaged loss
        losses[arm] = {k: next(iter(v)) for k, v in by_step.items()}
    assert all(np.isfinite(v) for v in losses["zero"].values()), losses
    assert losses["zero"][1] == losses["dp"][1], losses
