"""Start a user's script as one rank: ``python -m orchestrator.runtime.bootstrap SCRIPT ARGS...``.

The script runs unchanged (as ``__main__``, with its own ``sys.argv``), so any
script written for ``mlx.launch`` works. Around it the bootstrap

* materialises ``MLX_HOSTFILE`` from ``ORCH_MLX_HOSTFILE_JSON`` when the
  controller could not write a file on this host;
* wraps ``mx.distributed.init`` to report ``init_start`` / ``ready`` events
  (the supervisor's init timeout names the ranks that never got ready) and,
  for the one rank that connects first, to wait at the start gate until its
  peers listen (the guard watches for that: MLX holds the GIL inside init, so
  no thread in this process could).
  That gate is what saves the ~1 s MLX loses when a rank connects before its
  neighbour listens and the ring backs off;
* writes one byte to ``ORCH_INIT_FD`` right before the real ``init``: only
  then does the guard start looking for the rank's listening socket, so a
  guard costs no CPU while its rank imports MLX or loads data. A rank that
  will not report (events off, no MLX) closes the pipe instead, and its guard
  never looks.

The gate and the init byte are ``runtime/ringstart.py`` (with the guard's half).
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
import time
import traceback

from orchestrator import protocol
from orchestrator.runtime import events, ringstart
from orchestrator.runtime.hard_exit import hard_exit

ENV_INIT_FD = protocol.ENV_INIT_FD  # the guard's name for it too (guard.ENV_INIT_FD)


def _materialise_hostfile() -> None:
    content = os.environ.pop(protocol.ENV_MLX_HOSTFILE_JSON, None)
    if content is None:
        return
    # In the remote run root (ORCH_RUN_DIR's parent, where the launcher stages the other per-job
    # files such as MLX_IBV_DEVICES, and which is retired with the run), not in /tmp, where one file
    # per rank and run would pile up; /tmp only when that directory is not there.
    run_dir = (os.environ.get(protocol.ENV_RUN_DIR) or "").rstrip("/")
    root = os.path.dirname(run_dir) if run_dir else ""
    fd, path = tempfile.mkstemp(prefix="mlx-hostfile-", suffix=".json", dir=root if root and os.path.isdir(root) else None)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.environ["MLX_HOSTFILE"] = path


def _install_init_hook() -> bool:
    try:
        import mlx.core as mx
    except ModuleNotFoundError as e:
        if e.name not in ("mlx", "mlx.core"):
            raise
        return False  # no MLX here: a script that does not use it runs without the hook
    except ImportError:
        # MLX is installed but failed to load: e.g. its CUDA build on a rank whose CUDA_VISIBLE_DEVICES
        # names no GPU ("cudaMallocManaged ... no CUDA-capable device"). Swallowing this is worse than
        # failing: the script's own import then finds half-registered types and nanobind aborts the rank
        # with "refusing to add duplicate key", hiding the cause. Report the cause, once, and stop.
        traceback.print_exc()
        print("orch: the rank cannot import mlx.core (above); nothing else was run", file=sys.stderr)
        sys.exit(1)
    real_init = mx.distributed.init
    state = {"done": False}

    def init(*args, **kwargs):
        if state["done"]:
            return real_init(*args, **kwargs)
        backend = kwargs.get("backend", args[1] if len(args) > 1 else "any")
        events.emit("init_start", backend=str(backend))
        t0 = time.monotonic()
        ringstart.wait_gate()
        ringstart.signal_init()
        group = real_init(*args, **kwargs)
        try:  # sum_scatter where the backend has none (nn.fully_shard needs it); never fatal to the rank
            from orchestrator.runtime import collectives
            collectives.install(group)
        except Exception as e:  # noqa: BLE001
            print(f"orch: sum_scatter: not installed ({type(e).__name__}: {e})", file=sys.stderr)
        state["done"] = True
        events.emit("ready", size=group.size(), init_s=round(time.monotonic() - t0, 4))
        return group

    mx.distributed.init = init
    return True


def _prepare_mpi() -> None:
    """Under mpirun: let MLX initialise MPI first, and tell mpi4py not to.

    Importing mpi4py.MPI before MLX's init makes Open MPI abort ("initialize MPI
    more than once"). With ``mpi4py.rc.initialize = False`` mpi4py uses the MPI
    that MLX initialised, and we initialise the group here, before the script
    runs, so a recipe may import mpi4py.MPI at any point.
    """
    try:
        import mpi4py

        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
    except ImportError:
        pass
    import mlx.core as mx

    mx.distributed.init(backend="mpi", strict=True)


def _configure_deferred(fd: int) -> None:
    """A pre-started rank: import MLX while the controller plans, then take its configuration.

    The configuration is one JSON line ``{"env", "argv", "cwd"}`` relayed by the
    guard; everything MLX and the script read (MLX_RANK, MLX_HOSTFILE, argv, cwd)
    is in place before the script runs.
    """
    import json

    try:
        import mlx.core  # noqa: F401  (the expensive part, done before the plan exists)
    except ImportError:
        pass  # this Python lacks MLX: the program's own import says so, where the diagnosis expects it

    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            sys.exit(1)  # the controller went away before configuring us
        buf += chunk
    os.close(fd)
    config = json.loads(buf)
    os.environ.update(config["env"])
    if config.get("cwd"):
        os.chdir(config["cwd"])
    sys.argv = [sys.argv[0], *config["argv"]]


# Open MPI tells each rank who it is only at start; scripts read torchrun's names (RANK, LOCAL_RANK...),
# which every other backend gets from the plan. Filled in here, before any form of program starts.
_FROM_OPEN_MPI = {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
                  "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_WORLD_SIZE": "OMPI_COMM_WORLD_LOCAL_SIZE"}


def _rank_names_from_mpi(env=os.environ) -> None:
    """Under mpirun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE from Open MPI's variables (never overriding)."""
    if env.get(protocol.ENV_BACKEND) != "mpi":
        return
    for name, ompi in _FROM_OPEN_MPI.items():
        if ompi in env and name not in env:
            env[name] = env[ompi]


def main() -> None:
    ringstart.take_init_fd()
    _rank_names_from_mpi()
    config_fd = os.environ.pop(protocol.ENV_CONFIG_FD, None)
    if config_fd is not None:
        _configure_deferred(int(config_fd))
    if len(sys.argv) < 2 or (sys.argv[1] in ("-m", "--exec") and len(sys.argv) < 3):
        print("usage: python -m orchestrator.runtime.bootstrap (SCRIPT | -m MODULE | --exec PROGRAM) [ARGS...]",
              file=sys.stderr)
        sys.exit(2)
    kind, target, args = _program(sys.argv[1:])
    _materialise_hostfile()
    if kind == "exec":  # not Python: the program replaces us, with the environment and files in place
        ringstart.signal_init(b"")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            os.execvp(target, [target, *args])
        except OSError as e:
            print(f"orch: cannot run {target!r}: {e.strerror}", file=sys.stderr)
            sys.exit(127)
    sys.argv = [target, *args]
    sys.excepthook = _print_exception  # the program's traceback without orch's frames above it
    _register_stack_dump()
    if not (events.enabled() and _install_init_hook()):
        ringstart.signal_init(b"")  # no hook, no byte: the guard need not watch
    if os.environ.get(protocol.ENV_BACKEND) == "mpi":
        _prepare_mpi()
    if kind == "script":
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    else:
        sys.path.insert(0, os.getcwd())  # as `python -m` does
    try:  # mlx-lm's LoRA trainer: exact restarts (integrations/mlx_lm_resume.py; hook() itself never raises)
        from orchestrator.integrations import mlx_lm_resume
        mlx_lm_resume.hook(kind, target, sys.argv)
    except ImportError:
        pass
    try:  # mlx-lm's validation as a phase: the step-cadence watchdog waits for it (integrations/mlx_lm_phases.py)
        from orchestrator.integrations import mlx_lm_phases
        mlx_lm_phases.install(kind, target, sys.argv)
    except Exception as e:  # noqa: BLE001 - never fatal to the rank
        print(f"orch: mlx-lm validation phases are off ({type(e).__name__}: {e})", file=sys.stderr)
    if os.environ.get(protocol.ENV_BACKEND) != "mpi":
        _run(kind, target)
        return
    # Under MPI a rank that fails must not reach MPI_Finalize at exit: it is
    # collective, so the failed rank would wait there forever for peers that
    # are themselves blocked in a collective waiting for it.
    try:
        _run(kind, target)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        hard_exit(e.code if isinstance(e.code, int) else 1)
    except BaseException as e:
        _print_exception(type(e), e, e.__traceback__)
        hard_exit(1)


def _register_stack_dump() -> None:
    """On ``protocol.DUMP_SIGNAL_NAME``, write every thread's Python stack to stderr (the hang diagnosis reads it)."""
    import faulthandler
    import signal

    try:
        faulthandler.register(getattr(signal, protocol.DUMP_SIGNAL_NAME), all_threads=True, chain=False)
    except (AttributeError, ValueError, RuntimeError, OSError):  # no such signal here, or stderr unusable
        pass


def _program(argv: list[str]) -> tuple[str, str, list[str]]:
    """("script" | "module" | "exec", target, args) from ``SCRIPT ARGS``, ``-m MODULE ARGS``, ``--exec PROGRAM ARGS``.

    A command that is a Python console script (``mlx_lm.lora``: a file on PATH
    whose ``#!`` line names a Python) runs here as a script, so its
    ``mx.distributed.init`` is seen like ours; anything else is exec'd.
    """
    if argv[0] == "-m":
        return "module", argv[1], argv[2:]
    if argv[0] != "--exec":
        return "script", argv[0], argv[1:]
    program, args = argv[1], argv[2:]
    import shutil

    path = program if os.sep in program else shutil.which(program)
    if path and os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                first = f.readline(256)
        except OSError:
            first = b""
        if first.startswith(b"#!") and b"python" in first:
            return "script", path, args
    return "exec", program, args


def _user_frames(tb):
    """The traceback from the program's own first frame: orch's bootstrap and runpy's frames left out.

    A rank's traceback is read by people (its log, the failure's last lines): the five frames
    of ``python -m orchestrator.runtime.bootstrap`` -> ``runpy`` above the user's code say
    nothing about their program. An error raised in the bootstrap itself keeps every frame.
    """
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__)}
    first = tb
    while first is not None:
        name = first.tb_frame.f_code.co_filename
        if not (name.startswith("<frozen runpy") or os.path.abspath(name) in ours):
            return first
        first = first.tb_next
    return tb


def _print_exception(exc_type, exc, tb) -> None:
    """``sys.excepthook`` for the program: Python's own report, from the program's first frame."""
    try:
        traceback.print_exception(exc_type, exc, _user_frames(tb))
    except Exception:  # noqa: BLE001 - never lose the report: Python's own hook then
        sys.__excepthook__(exc_type, exc, tb)


def _run(kind: str, target: str) -> None:
    """Run the program as ``python -m MODULE`` / ``python SCRIPT`` would, and fail as they do: in one report.

    A module that is not there, or a script that does not compile, has no frame of the program's
    own to start a traceback from; what Python itself prints then (``No module named x``, the
    ``SyntaxError`` with its line and caret) is what the rank prints, not a traceback through here.
    """
    if kind == "module":
        _check_module(target)
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    try:
        runpy.run_path(target, run_name="__main__")
    except SyntaxError as e:
        if e.filename is None or os.path.abspath(e.filename) != os.path.abspath(target):
            raise  # raised by the program's own code (an exec, an import): its traceback says where
        traceback.print_exception(type(e), e, None)
        sys.exit(1)


def _check_module(name: str) -> None:
    """``-m NAME`` where this Python has no ``NAME`` (or no package above it): one line, exit 2."""
    import importlib.util

    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as e:  # a package above it is missing (else: the package's own code failed)
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise
        found = False
    if not found:
        print(f"orch: no module named {name!r} for this rank's Python ({sys.executable}, in {os.getcwd()}); "
              "check the name, install it there, or give --cwd", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
