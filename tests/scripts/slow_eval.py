"""mlp_regression with slow steps (STEP_SLEEP_S) and a slow evaluation on rank 0 (SLOW_EVAL_S):
the evaluation lasts many step intervals, and the cadence watchdog must not call it a hang."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from mlp_regression import recipe  # noqa: E402

from orchestrator.runtime import Recipe, run, trainer  # noqa: E402

STEP_SLEEP = float(os.environ.get("STEP_SLEEP_S", "0.3"))
SLOW_EVAL = float(os.environ.get("SLOW_EVAL_S", "8"))


real_emit = trainer.emit


def emit(kind, **fields):
    if kind == "step":
        time.sleep(STEP_SLEEP)  # every step takes at least this long
    real_emit(kind, **fields)


trainer.emit = emit


def evaluate(model, hp):
    time.sleep(SLOW_EVAL)
    return {"evaluated": 1.0}


if __name__ == "__main__":
    run(Recipe(hparams=recipe.hparams, build=recipe.build, loss=recipe.loss, data=recipe.data, evaluate=evaluate,
               name="slow_eval"))
