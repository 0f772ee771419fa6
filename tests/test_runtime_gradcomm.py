"""``--grad-dtype``: what the all-reduce is handed, and what 2 real ranks train with it.

Unit tests replace ``mx.distributed.all_sum`` (and hand in a 2-rank group
stand-in) to see exactly which arrays reach the collective; the integration
test runs real ranks on MLX's ring backend.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from orchestrator.runtime.config import Hparams, parse_hparams
from orchestrator.runtime.gradcomm import GradientAverager
from tests.runtime_helpers import RECIPES, latest_checkpoint, launch, load_arrays, max_abs_diff


class TwoRanks:
    """The part of ``mx.distributed.Group`` the averager uses: a world of 2 as seen from rank 0."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


@pytest.fixture
def collective(monkeypatch):
    """Record every array handed to all_sum; the "other rank" contributes the same values."""
    seen: list[mx.array] = []

    def all_sum(x, *, group=None, stream=None):
        seen.append(x)
        return x + x

    monkeypatch.setattr(mx.distributed, "all_sum", all_sum)
    return seen


ROWS, COLS = 1024, 1040  # 1,064,960 weights: over NARROW_MIN_BYTES in a 2-byte wire dtype


def gradients(rows=ROWS, cols=COLS):
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((rows, cols), dtype=np.float32)).T  # column-major, like nn.Linear's grads
    b = mx.array(rng.standard_normal((cols,), dtype=np.float32))
    mx.eval(w, b)
    return {"layers": [{"weight": w, "bias": b}]}, mx.array(1.2345678, dtype=mx.float32)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_a_narrow_wire_dtype_is_what_the_collective_sums(collective, wire):
    grads, loss = gradients()
    averaged, avg_loss = GradientAverager(TwoRanks(), wire)(grads, loss)
    mx.eval(averaged, avg_loss)
    # The loss alone in float32 first, then the gradients in the narrow dtype (one bucket).
    assert [(a.dtype, a.size) for a in collective] == [(mx.float32, 1)] + [(getattr(mx, wire), n) for n in
                                                                          (ROWS * COLS, COLS)]
    # Back in float32, original shapes, equal up to one rounding to the wire dtype ...
    for name in ("weight", "bias"):
        got, want = averaged["layers"][0][name], grads["layers"][0][name]
        assert got.dtype == mx.float32 and got.shape == want.shape
        assert np.allclose(np.array(got), np.array(want), rtol=2.0 ** -7, atol=1e-4)  # atol: float16 subnormals
    # ... and that rounding did happen (the values really went through the narrow dtype).
    w = grads["layers"][0]["weight"]
    assert np.array_equal(np.array(averaged["layers"][0]["weight"]), np.array(w.astype(getattr(mx, wire)).astype(mx.float32)))
    assert not np.array_equal(np.array(averaged["layers"][0]["weight"]), np.array(w))
    assert avg_loss.dtype == mx.float32 and avg_loss.item() == loss.item()


def test_a_narrow_wire_pipelines_big_gradients_in_own_buckets_on_one_comm_stream(monkeypatch):
    """Big gradients each get their own all_sum (cast straight to the wire buffer, overlapping the
    transfer of the others); small ones share one; every collective runs on the averager's single
    communication stream (two threads driving the ring at once would interleave its messages)."""
    calls = []

    def all_sum(x, *, group=None, stream=None):
        calls.append((x.dtype, x.size, stream))
        return x + x

    monkeypatch.setattr(mx.distributed, "all_sum", all_sum)
    rng = np.random.default_rng(1)
    big = [mx.array(rng.standard_normal((1024, 600), dtype=np.float32)).T for _ in range(2)]  # 1.2 MB in bf16
    small = [mx.array(rng.standard_normal((64,), dtype=np.float32)) for _ in range(3)]
    grads = {"big": big, "small": small}
    averager = GradientAverager(TwoRanks(), "bfloat16")
    averaged, avg_loss = averager(grads, mx.array(0.5))
    mx.eval(averaged, avg_loss)
    assert sorted((str(d), n) for d, n, _ in calls) == sorted(
        [("mlx.core.float32", 1), ("mlx.core.bfloat16", 600 * 1024), ("mlx.core.bfloat16", 600 * 1024),
         ("mlx.core.bfloat16", 3 * 64)])
    assert calls[0][:2] == (mx.float32, 1)  # the loss first
    assert {s for _, _, s in calls} == {averager.comm} and averager.comm != mx.default_stream(mx.cpu)
    for got, want in zip(averaged["big"] + averaged["small"], big + small):
        assert got.shape == want.shape and got.dtype == mx.float32
        assert np.array_equal(np.array(got), np.array(want.astype(mx.bfloat16).astype(mx.float32)))
    assert avg_loss.item() == 0.5


def test_float32_sends_gradients_and_loss_in_one_float32_buffer(collective):
    grads, loss = gradients()
    averaged, avg_loss = GradientAverager(TwoRanks(), "float32")(grads, loss)
    mx.eval(averaged, avg_loss)
    assert [(a.dtype, a.size) for a in collective] == [(mx.float32, ROWS * COLS + COLS + 1)]
    for name in ("weight", "bias"):
        assert np.array_equal(np.array(averaged["layers"][0][name]), np.array(grads["layers"][0][name]))
    assert avg_loss.item() == loss.item()


@pytest.mark.parametrize("wire, width", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_payload_bytes_count_each_gradient_in_the_dtype_it_travels_in(wire, width):
    grads, _ = gradients()
    grads["step"] = mx.array([3], dtype=mx.int32)  # not a float: travels as it is, never narrowed
    assert GradientAverager(TwoRanks(), wire).payload_bytes(grads) == (ROWS * COLS + COLS) * width + 4 + 4 + 4
    small, _ = gradients(48, 32)  # latency-bound: float32 whatever the wire dtype
    assert GradientAverager(TwoRanks(), wire).payload_bytes(small) == (48 * 32 + 32) * 4 + 4 + 4


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_small_gradients_travel_in_float32_with_the_loss_and_make_no_stream(collective, wire):
    grads, loss = gradients(48, 32)
    averager = GradientAverager(TwoRanks(), wire)
    averaged, avg_loss = averager(grads, loss)
    mx.eval(averaged, avg_loss)
    assert [(a.dtype, a.size) for a in collective] == [(mx.float32, 48 * 32 + 32 + 1)]
    for name in ("weight", "bias"):
        assert np.array_equal(np.array(averaged["layers"][0][name]), np.array(grads["layers"][0][name]))
    assert averager._comm is None  # no second CPU stream: it would slow every later collective


def test_an_unknown_grad_dtype_is_refused_by_the_flag_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_hparams(Hparams, ["--grad-dtype", "int8"])
    assert exc.value.code == 2
    assert "--grad-dtype: invalid choice: 'int8'" in capsys.readouterr().err
    assert parse_hparams(Hparams, ["--grad-dtype", "bfloat16"]).grad_dtype == "bfloat16"


@pytest.mark.slow
def test_two_ranks_training_with_bfloat16_gradients_stay_close_to_float32(tmp_path):
    common = ["--samples", "512", "--hidden", "1200", "--stats-every", "0", "--steps", "20",  # 2.9 MB in bf16
              "--optimizer", "sgd", "--lr", "1e-2", "--batch-size", "8"]
    runs, wire_of = {}, {}
    for wire in ("float32", "bfloat16"):
        ranks = launch(RECIPES / "mlp_regression.py", 2, tmp_path / wire, common + ["--grad-dtype", wire], timeout=120)
        runs[wire] = (load_arrays(latest_checkpoint(tmp_path / wire)), [e["loss"] for e in ranks[0].of_kind("step")])
        wire_of[wire] = ranks[0].of_kind("metric")[-1]["values"]
    (a, loss_a), (b, loss_b) = runs["float32"], runs["bfloat16"]
    diff = max_abs_diff(a, b)
    assert 0 < diff < 2e-2, diff  # not identical (bf16 was used), but close
    assert len(loss_b) == 20 and np.allclose(loss_a, loss_b, rtol=2e-2)
    assert loss_b[-1] < 0.9 * loss_b[0]  # and it still learns
    # Each rank's end-of-run metrics say what a step put on the wire: bfloat16 halves the payload, and a
    # ring all-reduce of it sends 2(N-1)/N of it, here all of it.
    n_params = sum(a[k].size for k in a if k.startswith("model."))
    assert wire_of["float32"]["allreduce_payload_bytes_per_step"] == 4 * n_params + 4 + 4  # + the loss, the stop flag
    assert wire_of["bfloat16"]["allreduce_payload_bytes_per_step"] == 2 * n_params + 4 + 4
    for m in wire_of.values():
        assert m["bytes_sent_per_step"] == m["allreduce_payload_bytes_per_step"]

