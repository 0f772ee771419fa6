"""The training loop on real rank processes: data-parallel equivalence and bit-exact resume.

Ranks are started by ``tests.runtime_helpers.launch`` (ring backend on 127.0.0.1).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime_helpers import RECIPES, latest_checkpoint, launch, load_arrays, max_abs_diff

MLP = RECIPES / "mlp_regression.py"
SMALL = ["--samples", "512", "--hidden", "16", "--stats-every", "0"]

pytestmark = pytest.mark.slow


def train(tmp_path, name: str, n: int, args: list[str], timeout: float = 90):
    run_dir = tmp_path / name
    results = launch(MLP, n, run_dir, SMALL + args, timeout=timeout)
    return run_dir, results


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_two_ranks_with_batch_b_end_where_one_rank_with_batch_2b_ends(tmp_path, optimizer):
    common = ["--steps", "20", "--optimizer", optimizer, "--lr", "1e-2"]
    one, single = train(tmp_path, "one", 1, common + ["--batch-size", "16"])
    two, ranks = train(tmp_path, "two", 2, common + ["--batch-size", "8"])
    a, b = load_arrays(latest_checkpoint(one)), load_arrays(latest_checkpoint(two))
    assert max_abs_diff(a, b) < 1e-5
    assert max_abs_diff(a, b, prefix="optimizer.") < 1e-5
    # The parameters moved (so the comparison means something) ...
    init_dir, _ = train(tmp_path, "init", 1, ["--steps", "0", "--batch-size", "16"])
    assert max_abs_diff(a, load_arrays(latest_checkpoint(init_dir))) > 1e-2
    # ... both ranks report the same (averaged) loss, close to the single rank's.
    losses = [[e["loss"] for e in r.of_kind("step")] for r in ranks]
    assert len(losses[0]) == 20 and losses[0] == losses[1]
    assert np.allclose(losses[0], [e["loss"] for e in single[0].of_kind("step")], rtol=1e-4)


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    common = ["--steps", "20", "--optimizer", "adam", "--lr", "1e-2"]
    big, _ = train(tmp_path, "big", 1, common + ["--batch-size", "16"])
    accum, _ = train(tmp_path, "accum", 1, common + ["--batch-size", "4", "--grad-accum", "4"])
    assert max_abs_diff(load_arrays(latest_checkpoint(big)), load_arrays(latest_checkpoint(accum))) < 1e-5


@pytest.mark.parametrize("n", [1, 2])
def test_resume_is_bit_exact_with_adam_and_dropout(tmp_path, n):
    common = ["--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8", "--dropout", "0.2"]
    straight, _ = train(tmp_path, "straight", n, common + ["--steps", "20"])
    resumed, _ = train(tmp_path, "resumed", n, common + ["--steps", "10"])
    _, ranks = train(tmp_path, "resumed", n, common + ["--steps", "20", "--resume"])
    assert "resumed from" in ranks[0].text
    assert all(r.of_kind("step")[0]["step"] == 11 for r in ranks)
    a, b = load_arrays(latest_checkpoint(straight)), load_arrays(latest_checkpoint(resumed))
    assert sorted(a) == sorted(b) and any(k.endswith(".v") for k in a)  # Adam's state is in there
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
