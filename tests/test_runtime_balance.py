"""``--balance speed``: per-rank batches proportional to speed, the global batch and the update unchanged.

Unit tests of the arithmetic (``runtime/balance.py``: the split, the weights,
the sampler, the decision) and, on real rank processes, the exactness proof:
2 ranks with unequal and changing shares end where 1 rank with the global
batch ends. The re-balance is forced at a known step through the test hook
``ORCH_BALANCE_TEST_SPEEDS`` (the measured speeds replaced by a schedule; the
all-gather and the decision run for real), never by timing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from orchestrator.runtime.balance import (
    TEST_SPEEDS_ENV, BalancedSampler, Balancer, parse_test_speeds, split, step_time, weight,
)
from orchestrator.runtime.config import Hparams, parse_hparams
from orchestrator.runtime.data import ShardedSampler
from tests.runtime_helpers import RECIPES, latest_checkpoint, launch, load_arrays, max_abs_diff

MLP = RECIPES / "mlp_regression.py"
SMALL = ["--samples", "512", "--hidden", "16", "--stats-every", "0"]


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize(("total", "weights", "expect"), [
    (16, [1, 3], [4, 12]),
    (16, [3, 1], [12, 4]),
    (16, [1, 1], [8, 8]),
    (10, [1, 2, 3.5], [2, 3, 5]),
    (3, [100, 1, 1], [1, 1, 1]),          # everyone keeps at least one sample
    (4, [0, math.nan, 1, 1], [1, 1, 1, 1]),  # a rank that reported nothing still gets a share
])
def test_split_is_proportional_sums_to_the_total_and_gives_everyone_one(total, weights, expect):
    assert split(total, weights) == expect


def test_split_properties_over_many_random_weights():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 9))
        total = int(rng.integers(n, 300))
        w = list(rng.uniform(0.01, 10, size=n))
        shares = split(total, w)
        assert sum(shares) == total and min(shares) >= 1
        ideal = [total * x / sum(w) for x in w]
        if min(ideal) >= 1:  # nobody lifted to the minimum of one: everyone within one sample of the ideal
            assert all(abs(b - i) < 1 for b, i in zip(shares, ideal)), (total, w, shares)
        else:
            assert all(b >= i or b >= math.floor(i) - n for b, i in zip(shares, ideal))


def test_split_refuses_fewer_samples_than_ranks():
    with pytest.raises(ValueError, match="at least one"):
        split(2, [1, 1, 1])


def test_weights_turn_the_averaging_all_reduce_into_the_global_batch_mean():
    rng = np.random.default_rng(1)
    shares = [3, 9, 4]
    per_sample = rng.normal(size=(sum(shares), 5))
    bounds = np.cumsum([0] + shares)
    means = [per_sample[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]
    averaged = sum(weight(shares, r) * means[r] for r in range(3)) / 3  # what all_sum / N computes
    assert np.allclose(averaged, per_sample.mean(0), atol=1e-12)
    assert weight([8, 8], 0) == 1.0 and weight([8, 8], 1) == 1.0  # equal shares: untouched gradients


def test_step_time_is_the_slowest_ranks():
    assert step_time([8, 8], [1, 4]) == 8.0
    assert step_time([4, 12], [1, 3]) == 4.0


# ----------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_the_ranks_samples_are_exactly_the_global_batch_whatever_the_shares(grad_accum):
    n, world, b = 200, 3, 4
    one = ShardedSampler(n, rank=0, world=1, batch_size=world * b, grad_accum=grad_accum, seed=5)
    ranks = [BalancedSampler(n, rank=r, world=world, batch_size=b, grad_accum=grad_accum, seed=5)
             for r in range(world)]
    schedule = {0: [4, 4, 4], 2: [1, 2, 9], 5: [6, 5, 1]}
    for step in range(12):  # crosses epoch ends: 200 // 36 = 5 steps per epoch at grad_accum 3
        if step in schedule:
            for s in ranks:
                s.set_shares(schedule[step])
        epoch, big = one.next_step()
        outs = [s.next_step() for s in ranks]
        assert all(e == epoch for e, _ in outs)
        for j in range(grad_accum):
            union = np.concatenate([micro[j] for _, micro in outs])
            assert np.array_equal(union, big[j]), (step, j)  # same samples, in rank order
            assert [len(micro[j]) for _, micro in outs] == ranks[0].shares


def test_equal_shares_yield_what_the_plain_sampler_yields():
    plain = ShardedSampler(100, rank=1, world=2, batch_size=5, grad_accum=2, seed=3)
    balanced = BalancedSampler(100, rank=1, world=2, batch_size=5, grad_accum=2, seed=3)
    for _ in range(15):
        (e1, m1), (e2, m2) = plain.next_step(), balanced.next_step()
        assert e1 == e2 and all(np.array_equal(a, b) for a, b in zip(m1, m2))


def test_shares_that_do_not_split_the_global_micro_batch_are_refused():
    s = BalancedSampler(100, rank=0, world=2, batch_size=5, grad_accum=1, seed=0)
    for bad in ([5, 4], [10, 0], [5, 5, 0]):
        with pytest.raises(ValueError, match="do not split"):
            s.set_shares(bad)


# ----------------------------------------------------------------------------- the decision


def test_checks_come_after_warmup_then_every_n_steps_and_change_shares_only_past_the_threshold():
    schedule = [(0, [1.0, 3.0]), (12, [1.0, 3.3]), (20, [3.0, 1.0])]

    def gather_for(rank):
        def gather(mine):  # what the all_sum hands back: every rank's number
            speeds = [s for at, s in schedule if at <= step][-1]
            assert mine == speeds[rank]
            return speeds
        return gather

    bals = [Balancer(world=2, rank=r, global_micro=16, gather=gather_for(r), every=5, warmup=3, threshold=0.1,
                     test_speeds=schedule) for r in range(2)]
    for b in bals:
        b.start(0)
    changes = []
    for step in range(1, 31):
        for b in bals:
            b.record(0.01)
        ds = [b.check(step) for b in bals]
        assert ds[0] == ds[1]  # every rank decides the same
        if ds[0] is not None and ds[0].changed:
            changes.append((step, ds[0].reason, ds[0].shares))
    # First check at step 4 (step 1 is warm-up, then 3 measured), then 9, 14, 19, 24, 29.
    assert [d.step for d in bals[0].decisions] == [4, 9, 14, 19, 24, 29]
    # 1:3.3 would still be [4, 12]; 3:1 flips the shares at the first check after step 20.
    assert changes == [(4, "calibration", [4, 12]), (24, "drift", [12, 4])]


def test_a_drift_below_the_threshold_keeps_the_shares():
    bal = Balancer(world=2, rank=0, global_micro=100, gather=lambda s: [s, 1.0], every=1, warmup=1,
                   threshold=0.1, shares=[50, 50], test_speeds=[(0, [1.1, 1.0])])
    bal.start(0)
    bal.record(1.0)
    bal.record(1.0)
    d = bal.check(2)
    assert d is not None and not d.changed and bal.shares == [50, 50]  # [52, 48] would gain < 10 %


def test_measured_speed_is_samples_over_compute_seconds_after_the_first_step():
    got = []
    bal = Balancer(world=2, rank=1, global_micro=8, gather=lambda s: got.append(s) or [1.0, s], every=5, warmup=2)
    bal.start(0)
    bal.record(100.0, samples=4)  # step 1: warm-up, not counted
    bal.record(0.5, samples=4)
    bal.record(1.5, samples=4)
    assert bal.check(3) is not None and got == [4.0]  # 8 samples in 2 s


def test_test_speeds_parse_and_refuse_a_wrong_count():
    assert parse_test_speeds("3,1@10; 1,3@0", 2) == [(0, [1.0, 3.0]), (10, [3.0, 1.0])]
    with pytest.raises(ValueError, match=TEST_SPEEDS_ENV):
        parse_test_speeds("1,2,3@0", 2)
    with pytest.raises(ValueError, match=TEST_SPEEDS_ENV):
        parse_test_speeds("fast,slow", 2)


def test_balance_flags_are_validated_in_one_line():
    hp = parse_hparams(Hparams, ["--balance", "speed", "--balance-every", "4"])
    assert hp.balance == "speed" and hp.balance_every == 4
    with pytest.raises(SystemExit, match="--balance-threshold must be in"):
        parse_hparams(Hparams, ["--balance-threshold", "1.5"])
    with pytest.raises(SystemExit, match="--balance-every must be >= 1"):
        parse_hparams(Hparams, ["--balance-every", "0"])


# ----------------------------------------------------------------------------- real ranks


def _train(tmp_path, name, n, args, env=None):
    run_dir = tmp_path / name
    return run_dir, launch(MLP, n, run_dir, SMALL + args, timeout=120, extra_env=env)


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "accum"), [("sgd", 1), ("adam", 1), ("adam", 2)])
def test_unequal_changing_shares_end_where_one_rank_with_the_global_batch_ends(tmp_path, optimizer, accum):
    common = ["--steps", "20", "--optimizer", optimizer, "--lr", "1e-2", "--grad-accum", str(accum)]
    one, single = _train(tmp_path, "one", 1, common + ["--batch-size", "16"])
    # Speeds 1:3 from the start, 3:1 from step 10: shares [4, 12] after the calibration at step 4,
    # [12, 4] after the check at step 14 (checks at 4, 9, 14, 19).
    two, ranks = _train(tmp_path, "two", 2, common + ["--batch-size", "8", "--balance", "speed", "--balance-every", "5"],
                        env={TEST_SPEEDS_ENV: "1,3@0;3,1@10"})
    for r in ranks:
        events = r.of_kind("rebalance")
        assert [(e["step"], e["reason"], e["shares"]) for e in events] == [
            (0, "start", [8, 8]), (4, "calibration", [4, 12]), (14, "drift", [12, 4])]
    a, b = load_arrays(latest_checkpoint(one)), load_arrays(latest_checkpoint(two))
    assert max_abs_diff(a, b) < 1e-5
    assert max_abs_diff(a, b, prefix="optimizer.") < 1e-5
    # The parameters moved (so the comparison means something) ...
    init_dir, _ = _train(tmp_path, "init", 1, ["--steps", "0", "--batch-size", "16"])
    assert max_abs_diff(a, load_arrays(latest_checkpoint(init_dir))) > 1e-2
    # ... and the reported loss is the global-batch mean on both ranks.
    losses = [[e["loss"] for e in r.of_kind("step")] for r in ranks]
    assert len(losses[0]) == 20 and losses[0] == losses[1]
    assert np.allclose(losses[0], [e["loss"] for e in single[0].of_kind("step")], rtol=1e-4)


@pytest.mark.slow
def test_the_checkpoint_keeps_the_shares_and_a_resume_starts_from_them(tmp_path):
    args = ["--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8", "--balance", "speed", "--balance-every", "5"]
    env = {TEST_SPEEDS_ENV: "1,3@0"}
    run_dir, _ = _train(tmp_path, "run", 2, args + ["--steps", "10"], env=env)
    assert json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["balance_shares"] == [4, 12]
    # Resumed at step 10 with [4, 12]; with equal speeds the calibration at step 14 goes back to [8, 8].
    _, ranks = _train(tmp_path, "run", 2, args + ["--steps", "16", "--resume"], env={TEST_SPEEDS_ENV: "1,1@0"})
    for r in ranks:
        assert [(e["step"], e["reason"], e["shares"]) for e in r.of_kind("rebalance")] == [
            (10, "start", [4, 12]), (14, "calibration", [8, 8])]


@pytest.mark.slow
def test_measured_balance_on_real_timings_keeps_the_global_batch(tmp_path):
    """No forced speeds: whatever the timings decide, shares sum to the global micro-batch and training ends."""
    _, ranks = _train(tmp_path, "run", 2, ["--steps", "12", "--batch-size", "8", "--balance", "speed",
                                           "--balance-every", "2", "--balance-warmup", "1"])
    for r in ranks:
        events = r.of_kind("rebalance")
        assert events and events[0]["reason"] == "start"
        assert all(sum(e["shares"]) == 16 and min(e["shares"]) >= 1 for e in events)
        assert all(e["speeds"] and min(e["speeds"]) > 0 for e in events[1:])
    assert ranks[0].of_kind("rebalance") == [{**e, "rank": 0, "t": a["t"]} for e, a in
                                             zip(ranks[1].of_kind("rebalance"), ranks[0].of_kind("rebalance"))]


# ----------------------------------------------------------------------------- where it shows


def test_the_live_view_shows_each_ranks_batch_share_only_when_balancing():
    import io

    from orchestrator.launch.base import RankSpec
    from orchestrator.live import LiveView
    from orchestrator.supervisor import RankState

    ss = [RankState(spec=RankSpec(rank=r, host=f"mac{r}", script="x.py")) for r in range(2)]
    for s in ss:
        s.record.steps, s.record.total_steps, s.record.last_loss, s.record.samples_per_s = 5, 10, 0.5, 100.0
    view = LiveView(ss, err=io.StringIO(), tty=True)
    assert "batch" not in "\n".join(view._lines()) and "batch" not in view.final_table()
    ss[0].record.batch_share, ss[1].record.batch_share = 12, 4
    lines = view._lines()
    assert "batch" in lines[1] and lines[2].endswith("12 (75%)") and lines[3].endswith("4 (25%)")
    table = view.final_table().splitlines()
    assert "batch" in table[0] and table[1].endswith("12 (75%)") and table[2].endswith("4 (25%)")


@pytest.mark.slow
def test_orch_run_records_the_rebalances_in_the_summary_the_final_table_and_the_report(tmp_path):
    from orchestrator.report import format_summary, load_run, render_html
    from tests.orch_helpers import run_orch, summary

    run_dir = tmp_path / "run"
    r = run_orch("run", str(MLP), "-n", "2", "--run-dir", str(run_dir), "--env", f"{TEST_SPEEDS_ENV}=1,3@0;3,1@10",
                 "--", *SMALL, "--steps", "20", "--batch-size", "8", "--balance", "speed", "--balance-every", "5",
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    s = summary(run_dir)
    assert [(b["step"], b["reason"], b["shares"]) for b in s["rebalances"]] == [
        (0, "start", [8, 8]), (4, "calibration", [4, 12]), (14, "drift", [12, 4])]
    assert s["rebalances"][1]["speeds"] == [1.0, 3.0] and s["rebalances"][2]["previous"] == [4, 12]
    assert [rank["batch_share"] for rank in s["ranks"]] == [12, 4]
    assert "rebalance at step 14 (drift): per-rank batch [4, 12] -> [12, 4]" in r.stdout
    assert "12 (75%)" in r.stderr and "4 (25%)" in r.stderr  # the end-of-run table
    text = format_summary(load_run(run_dir))
    assert "batch shares (--balance speed)" in text and "4 : 12" in text and "12 : 4" in text
    html = render_html(load_run(run_dir), [])
    assert "<h2>Batch shares (--balance speed)</h2>" in html and "<td>12 : 4</td>" in html
    # The same from events alone (a run whose controller never wrote summary.json).
    (run_dir / "summary.json").unlink()
    text = format_summary(load_run(run_dir))
    assert "12 : 4" in text and "drift" in text
