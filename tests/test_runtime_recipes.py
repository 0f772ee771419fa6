"""The shipped recipes run, learn, and speak the protocol the controller expects."""

from __future__ import annotations

import typing

import pytest

from orchestrator import protocol
from tests.runtime_helpers import RECIPES, latest_checkpoint, launch

pytestmark = pytest.mark.slow

# kind -> its TypedDict, read from the protocol itself so the two cannot drift apart
EVENT_TYPES = {typing.get_args(typing.get_type_hints(t)["kind"])[0]: t for t in typing.get_args(protocol.Event)}


def assert_protocol_shapes(events: list[dict]) -> None:
    for event in events:
        expected = set(typing.get_type_hints(EVENT_TYPES[event["kind"]]))
        assert set(event) == expected, event


def test_events_of_a_two_rank_run(tmp_path):
    ranks = launch(RECIPES / "mlp_regression.py", 2, tmp_path,
                   ["--samples", "512", "--hidden", "16", "--steps", "6", "--batch-size", "8",
                    "--stats-every", "3", "--checkpoint-every", "4"], timeout=90)
    for r in ranks:
        assert_protocol_shapes(r.events)
        # The memory plan (runtime/memfit.py) is made before training starts; the rest is the training's.
        assert [e["kind"] for e in r.events][0] == "memory_plan"
        kinds = [e["kind"] for e in r.events if e["kind"] != "memory_plan"]
        # init_start/ready come from the bootstrap under orch, not from the trainer.
        assert kinds[0] == "train_start" and kinds[1] == "step" and kinds[-1] == "finished" and "ready" not in kinds
        assert all(e["rank"] == r.rank for e in r.events)
        steps = r.of_kind("step")
        assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
        assert all(e["total_steps"] == 6 and e["samples_per_s"] > 0 and e["step_time_s"] > 0 for e in steps)
        assert all(e["tokens_per_s"] is None for e in steps)
        assert [e["step"] for e in r.of_kind("memory")] == [3, 6]
    rank0, rank1 = ranks
    # Only rank 0 writes checkpoints and prints progress.
    assert [e["step"] for e in rank0.of_kind("checkpoint")] == [4, 6] and not rank1.of_kind("checkpoint")
    assert rank0.of_kind("checkpoint")[-1]["path"] == str(latest_checkpoint(tmp_path))
    assert "step 6/6" in rank0.text and rank1.text.strip() == ""


def test_digits_classifier_learns_and_reports_accuracy(tmp_path):
    (rank0,) = launch(RECIPES / "digits_classifier.py", 1, tmp_path, ["--steps", "150", "--stats-every", "0"],
                      timeout=120)
    (metric,) = rank0.of_kind("metric")
    assert metric["step"] == 150 and metric["values"]["test_samples"] == 359
    assert metric["values"]["accuracy"] > 0.85, metric


def test_char_lm_reports_tokens_per_second_and_perplexity(tmp_path):
    (rank0,) = launch(RECIPES / "char_lm.py", 1, tmp_path, ["--steps", "30", "--stats-every", "0"], timeout=120)
    steps = rank0.of_kind("step")
    assert all(e["tokens_per_s"] == pytest.approx(e["samples_per_s"] * 32) for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    (metric,) = rank0.of_kind("metric")
    assert 1 < metric["values"]["perplexity"] < 40
