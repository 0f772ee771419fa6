"""mlp_regression, except that rank CRASH_RANK dies (CRASH_HOW: kill|exit|raise) at step CRASH_AT
the first time only (a marker file in the run dir remembers; CRASH_ALWAYS=1: every time). For restart tests."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from mlp_regression import recipe  # noqa: E402

from orchestrator.runtime import run, trainer  # noqa: E402

marker = Path(os.environ.get("CRASH_MARKER") or Path(os.environ.get("ORCH_RUN_DIR", ".")) / "crashed-once")
crash_at = int(os.environ.get("CRASH_AT", "12"))
crash_rank = int(os.environ.get("CRASH_RANK", "1"))
real_emit = trainer.emit


def emit(kind, **fields):
    real_emit(kind, **fields)
    rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    if kind == "step" and fields["step"] == crash_at and rank == crash_rank and (
            os.environ.get("CRASH_ALWAYS") or not marker.exists()):
        marker.write_text("1")
        how = os.environ.get("CRASH_HOW", "kill")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise":
            raise RuntimeError("injected failure")
        os._exit(5)


trainer.emit = emit

if __name__ == "__main__":
    run(recipe)
