"""A rank that behaves like a JACCL rank where JACCL cannot run (MLX's Linux CPU build has no JACCL).

On a JACCL attempt (orch hands the rank ``MLX_IBV_DEVICES``) it replays what
real JACCL ranks printed, from the recorded outputs in tests/fixtures/stderr-jaccl/
(provenance in that folder's SOURCES.md), and then fails the way they did:

* ``JACCL_STANDIN=init_fail``: prints ``JACCL_STDERR_<rank>`` (a recorded file) to
  stderr and exits 1: JACCL failed while starting (e.g. RTR errno 22, exo#1390).
* ``JACCL_STANDIN=peer_loss``: every rank reports that it trained one step (so the
  hang watchdog is armed), then rank ``JACCL_DIE_RANK`` prints ``JACCL_DIE_STDERR`` and
  ends with ``JACCL_DIE_HOW`` (``segv``: SIGSEGV, as after a pulled cable, mlx#4192;
  ``stop``: it freezes (SIGSTOP), as a peer whose host vanished; or an exit code);
  every other rank first ignores SIGTERM, writes the marker file
  ``<ORCH_RUN_DIR>/spinning-<rank>``, prints ``JACCL_SPIN_STDERR`` and spins at 100%
  CPU forever, as JACCL survivors of a dead peer do (mlx#3910, #4278). The dying
  rank waits for every marker first (bounded), so the survivors are spinning with
  SIGTERM ignored before anyone is stopped.

Without ``MLX_IBV_DEVICES`` (the ring, after ``--fallback-backend ring``) it trains
the mlp_regression recipe, checkpoints and all, unless ``JACCL_STANDIN_ALWAYS=1``
(the same failure on a ring plan, for contrast).
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))


def _rank() -> int:
    return int(os.environ.get("MLX_RANK", "0"))


def _print_file(var: str) -> None:
    path = os.environ.get(var)
    if path:
        sys.stderr.write(Path(path).read_text())
        sys.stderr.flush()


def _peer_loss() -> None:
    from orchestrator.runtime import events

    rank, world = _rank(), int(os.environ.get("WORLD_SIZE", "2"))
    events.emit("train_start", step=0, total_steps=100)
    events.emit("step", step=1, epoch=0, loss=1.0, samples_per_s=1.0, tokens_per_s=None, step_time_s=0.1,
                total_steps=100)
    run_dir = Path(os.environ["ORCH_RUN_DIR"])
    die = int(os.environ.get("JACCL_DIE_RANK", "1"))
    if rank != die:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (run_dir / f"spinning-{rank}").write_text(str(os.getpid()))
        _print_file("JACCL_SPIN_STDERR")
        while True:  # a busy-wait, as JACCL's survivors do: no sleep, no syscalls
            pass
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all((run_dir / f"spinning-{r}").exists() for r in range(world) if r != die):
        time.sleep(0.05)
    _print_file("JACCL_DIE_STDERR")
    how = os.environ.get("JACCL_DIE_HOW", "segv")
    if how in ("segv", "stop"):
        sig = signal.SIGSEGV if how == "segv" else signal.SIGSTOP
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        while True:  # stopped: the guard's SIGTERM (with SIGCONT) ends it here
            time.sleep(1)
    os._exit(int(how))


if __name__ == "__main__":
    mode = os.environ.get("JACCL_STANDIN", "init_fail")
    if os.environ.get("MLX_IBV_DEVICES") or os.environ.get("JACCL_STANDIN_ALWAYS"):
        if mode == "peer_loss":
            _peer_loss()
        _print_file(f"JACCL_STDERR_{_rank()}")
        sys.exit(1)
    from mlp_regression import recipe

    from orchestrator.runtime import run

    run(recipe)
