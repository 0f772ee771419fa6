"""Hyper-parameters come from the command line, without pydantic, into a dataclass."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from orchestrator.runtime.config import RESUME_LATEST, Hparams, parse_hparams


@dataclass
class Config(Hparams):
    steps: int = 7
    hidden: int = 16
    dropout: float = 0.0
    text: str = "a.txt"
    tie_weights: bool = False
    warmup: Optional[int] = None


def test_defaults_come_from_the_dataclass():
    hp = parse_hparams(Config, [])
    assert (hp.steps, hp.hidden, hp.batch_size, hp.optimizer, hp.resume, hp.warmup) == (7, 16, 32, "adam", None, None)


def test_every_field_is_a_dashed_flag_with_its_type():
    hp = parse_hparams(Config, ["--steps", "200", "--lr", "3e-4", "--batch-size", "8", "--grad-accum", "2",
                                "--dropout", "0.5", "--text", "b.txt", "--tie-weights", "--warmup", "10",
                                "--optimizer", "sgd"])
    assert (hp.steps, hp.lr, hp.batch_size, hp.grad_accum) == (200, 3e-4, 8, 2)
    assert (hp.dropout, hp.text, hp.tie_weights, hp.warmup, hp.optimizer) == (0.5, "b.txt", True, 10, "sgd")
    assert parse_hparams(Config, ["--no-tie-weights"]).tie_weights is False


def test_leading_double_dash_from_orch_run_is_ignored():
    assert parse_hparams(Config, ["--", "--steps", "3"]).steps == 3


def test_resume_without_value_means_latest_and_with_value_a_path():
    assert parse_hparams(Config, ["--resume"]).resume == RESUME_LATEST
    assert parse_hparams(Config, ["--resume", "/x/step-00000010"]).resume == "/x/step-00000010"
    assert parse_hparams(Config, ["--resume", "--steps", "4"]).resume == RESUME_LATEST


@pytest.mark.parametrize("argv", [["--steps", "x"], ["--optimizer", "rmsprop"], ["--batch-size", "0"],
                                  ["--grad-accum", "0"], ["--no-such-flag"]])
def test_bad_values_exit_2_with_one_line(argv, capsys):
    """Every rank parses the same arguments: one line each, never argparse's usage text."""
    with pytest.raises(SystemExit) as e:
        parse_hparams(Config, argv, prog="recipe")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err


def test_a_mistyped_option_gets_a_did_you_mean(capsys):
    with pytest.raises(SystemExit):
        parse_hparams(Config, ["--stpes", "10"], prog="recipe")
    assert capsys.readouterr().err == "recipe: error: unrecognized arguments: --stpes 10 (did you mean --steps?)\n"


def test_importing_the_runtime_loads_neither_pydantic_nor_mlx():
    code = ("import sys, orchestrator.runtime as r; from orchestrator.runtime import Hparams, emit;"
            "bad = [m for m in ('pydantic', 'mlx', 'mlx.core') if m in sys.modules]; assert not bad, bad;"
            "from orchestrator.runtime import Recipe, run; assert 'mlx.core' in sys.modules;"
            "assert 'pydantic' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
