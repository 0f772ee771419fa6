"""mlp_regression, except that at step DEADLOCK_AT every rank, the first time only, waits in a
collective no peer ever joins: each rank receives from its left neighbour, so all of them spin at
100 % CPU inside MLX's ring, as a deadlocked ``all_sum`` does (ml-explore/mlx #4475). A marker file
per rank in the run directory remembers; the restarted attempt resumes from the checkpoint and
finishes. For the cadence watchdog's tests."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from mlp_regression import recipe  # noqa: E402

from orchestrator.runtime import run, trainer  # noqa: E402

deadlock_at = int(os.environ.get("DEADLOCK_AT", "6"))
real_emit = trainer.emit


def wait_for_a_peer_that_never_sends() -> None:
    import mlx.core as mx

    group = mx.distributed.init()
    left = (group.rank() - 1) % group.size()
    mx.eval(mx.distributed.recv_like(mx.zeros((4,)), left))


def emit(kind, **fields):
    real_emit(kind, **fields)
    rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    marker = Path(os.environ.get("DEADLOCK_MARKER_DIR") or os.environ.get("ORCH_RUN_DIR", ".")) / f"deadlocked-once-rank{rank}"
    if kind == "step" and fields["step"] == deadlock_at and not marker.exists():
        marker.write_text("1")
        wait_for_a_peer_that_never_sends()


trainer.emit = emit

if __name__ == "__main__":
    run(recipe)
