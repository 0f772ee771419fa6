"""The training loop on real rank processes: data-parallel equivalence and bit-exact resume.

Ranks are started by ``tests.runtime_helpers.launch`` (ring backend on 127.0.0.1).
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from orchestrator.runtime import checkpoint as ckpt
from tests.runtime_helpers import (
    RECIPES, collect, kill_group, latest_checkpoint, launch, load_arrays, max_abs_diff, start,
)

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


@pytest.mark.parametrize(("n", "extra"), [(1, []), (2, []), (2, ["--shard-optimizer"]), (2, ["--grad-dtype", "bfloat16", "--hidden", "1200"])])
def test_resume_is_bit_exact_with_adam_and_dropout(tmp_path, n, extra):
    common = ["--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8", "--dropout", "0.2"] + extra
    straight, _ = train(tmp_path, "straight", n, common + ["--steps", "20"])
    resumed, _ = train(tmp_path, "resumed", n, common + ["--steps", "10"])
    _, ranks = train(tmp_path, "resumed", n, common + ["--steps", "20", "--resume"])
    assert "resumed from" in ranks[0].text
    assert all(r.of_kind("step")[0]["step"] == 11 for r in ranks)
    a, b = load_arrays(latest_checkpoint(straight)), load_arrays(latest_checkpoint(resumed))
    assert sorted(a) == sorted(b) and any(k.endswith(".v") for k in a)  # Adam's state is in there
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_ranks_that_built_different_models_stop_with_a_diagnosis(tmp_path):
    results = launch(MLP, 2, tmp_path / "run", lambda rank: SMALL + ["--steps", "3", "--hidden", str(16 + 8 * rank)],
                     timeout=60, check=False)
    assert all(r.returncode not in (0, None) for r in results), [r.returncode for r in results]
    assert "rank 1 built a model/optimizer that differs from rank 0's" in results[1].stderr
    assert "other rank(s) failed to start" in results[0].stderr


def test_a_run_killed_at_random_moments_resumes_from_a_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = SMALL + ["--steps", "100000", "--checkpoint-every", "1", "--batch-size", "8"]
    rng = random.Random(7)
    for round_ in range(3):
        procs, files = start(MLP, 1, run_dir, args + (["--resume"] if round_ else []))
        try:
            deadline = time.monotonic() + 60
            while '"kind":"checkpoint"' not in files[0][0].read_text() and procs[0].poll() is None:
                assert time.monotonic() < deadline, "no checkpoint written"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            assert procs[0].poll() is None, collect(procs, files)[0].stderr
        finally:
            for p in procs:
                kill_group(p)
        chosen = ckpt.resolve_resume("latest", base=run_dir)[0]
        ckpt.load(chosen)
    (rank0,) = launch(MLP, 1, run_dir, SMALL + ["--steps", str(chosen.step + 3), "--resume"], timeout=60)
    steps = [e["step"] for e in rank0.of_kind("step")]
    assert steps == [chosen.step + 1, chosen.step + 2, chosen.step + 3]


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    launch(MLP, 1, tmp_path, SMALL + ["--steps", "6", "--checkpoint-every", "3"], timeout=60)
    newest = tmp_path / "checkpoints" / "step-00000006" / "model.safetensors"
    newest.write_bytes(b"\0" * newest.stat().st_size)  # right size, wrong bytes: passes validation, fails to load
    (rank0,) = launch(MLP, 1, tmp_path, SMALL + ["--steps", "8", "--resume"], timeout=60)
    assert "resumed from" in rank0.text and "step-00000003" in rank0.text
    assert [e["step"] for e in rank0.of_kind("step")] == [4, 5, 6, 7, 8]


def test_a_resume_that_fails_on_rank_0_stops_every_rank(tmp_path):
    results = launch(MLP, 2, tmp_path, SMALL + ["--steps", "3", "--resume", str(tmp_path / "nowhere")],
                     timeout=60, check=False)
    assert "no such file or directory" in results[0].stderr
    assert "other rank(s) failed to start" in results[1].stderr
    assert all(r.returncode not in (0, None) for r in results)
