"""From a ``RunRequest`` to an immutable ``Job``: everything that can fail on bad input, before anything starts.

Torch elastic keeps a resolved spec (``WorkerSpec``) apart from live state; so does this:
a ``Job`` is the program, the hosts, the backend, the first plan, the run directory, the
timeouts and restart policy (the request's values, checked) and the output sink. It never
changes; a restart that drops a host or falls back to another backend makes a new one
(``dataclasses.replace``). The run directory is created and locked last, once everything
else is known to be right.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

from orchestrator import backends
from orchestrator.backends.base import Backend
from orchestrator.hostfile import (ConfigError, Hostfile, hosts_hostfile, load_hostfile, local_hostfile, parse_env_assignment,
                                  select_hosts)
from orchestrator.launch.base import Launcher
from orchestrator.launch.local import LocalLauncher
from orchestrator.plan import JobPlan, plan_job
from orchestrator.rundir import RunDir, default_run_dir
from orchestrator.run.request import RunRequest, check_values

if TYPE_CHECKING:
    from orchestrator.launch.mpi import MPIInstall


@dataclass(frozen=True)
class Sink:
    """Where a run's words go: rank output (``out``), orch's own lines (``err``, via ``say``)."""

    out: TextIO
    err: TextIO

    @classmethod
    def for_request(cls, req: RunRequest) -> "Sink":
        # --json: the summary owns stdout, rank output goes to stderr; a silent inner run (orch check
        # --collective) keeps everything off the terminal, where that command reports the result itself.
        return cls(out=sys.stderr if req.json_output else sys.stdout, err=io.StringIO() if req.silent else sys.stderr)

    def say(self, text: str) -> None:
        """One ``orch:`` line."""
        self.err.write(f"orch: {text}\n")


@dataclass(frozen=True)
class Job:
    req: RunRequest
    hostfile: Hostfile
    backend: Backend
    plan: JobPlan  # the first attempt's; planner.plan_job makes each later one
    rundir: RunDir
    script: str  # what names the run: the script's absolute path, the module, or the command
    mpi: Optional["MPIInstall"]
    sink: Sink = field(compare=False)

    def say(self, text: str) -> None:
        self.sink.say(text)

    def replan(self, hostfile: Optional[Hostfile] = None, backend: Optional[str] = None) -> JobPlan:
        """A fresh plan for the next attempt (new free ports), keeping a measured ring order."""
        plan = plan_job(hostfile or self.hostfile, backend or self.backend.name, self.req.connections_per_ip, None)
        return plan.model_copy(update={"ring_order": self.plan.ring_order})

    def with_(self, **changes) -> "Job":
        return replace(self, **changes)


def resolve(req: RunRequest) -> Job:
    """Bad input (hostfile, values, a busy or impossible run directory) raises ``ConfigError``; nothing starts."""
    sink = Sink.for_request(req)
    hostfile, plan, rundir, script, mpi = _prepare(req, sink)
    return Job(req=req, hostfile=hostfile, backend=backends.get(plan.backend), plan=plan, rundir=rundir,
               script=script, mpi=mpi, sink=sink)


def _load_cluster(req: RunRequest) -> Hostfile:
    if req.hostfile and req.n is not None:
        raise ConfigError("give either -n N (local ranks) or --hostfile FILE, not both")
    if req.hostfile and req.hosts:
        raise ConfigError("give either --hosts NAMES or --hostfile FILE, not both")
    if req.hostfile:
        hostfile = load_hostfile(req.hostfile)
    elif req.hosts:
        hostfile = hosts_hostfile(req.hosts, req.n or 1)
    else:
        if req.include or req.exclude:
            raise ConfigError("--include/--exclude pick hosts of a hostfile or --hosts; add --hostfile FILE")
        return local_hostfile(req.n if req.n is not None else 1)
    return select_hosts(hostfile, req.include, req.exclude)


def _check_script(req: RunRequest, hostfile: Hostfile) -> str:
    """The program, checked where this machine can check it; returns what names the run.

    A command (``-- PROGRAM``) is looked up as the ranks' ``execvp`` will, when
    every rank runs here: a typo is then one line before anything starts, as
    for a missing script. On remote hosts only the host can say.
    """
    if req.program == "module":
        if not all(part.isidentifier() for part in req.script.split(".")):
            raise ConfigError(f"-m {req.script}: not a module name (use e.g. -m mlx_lm)")
        return req.script
    local = all(h.is_local for h in hostfile.hosts)
    if local and req.python and not _findable(req.python, req, hostfile):
        raise ConfigError(f"--python {req.python}: no such interpreter here (not on PATH, not an executable file); "
                          "give the path of the Python the ranks should run")
    if req.program == "command":
        if req.script.startswith("-"):  # "-- -m MODULE" became a module run in the CLI; any other option did not
            raise ConfigError(f"-- {req.script}: after --, only -m MODULE goes to the rank's Python; set the "
                              "interpreter's options in the environment (--env PYTHONDEVMODE=1, PYTHONWARNINGS=..., "
                              "PYTHONOPTIMIZE=1; output is already unbuffered) or put code in a file")
        if local and not _findable(req.script, req, hostfile):
            raise ConfigError(f"-- {req.script}: no such program here (not on PATH, not a file); check the name, or "
                              "give its path")
        return req.script
    path = Path(req.script)
    if path.is_dir():
        raise ConfigError(f"{req.script}: a directory, not a script; give the Python file to run on every rank "
                          f"(e.g. {path / '__main__.py'}), or -m MODULE")
    if not path.is_file():
        raise ConfigError(f"{req.script}: no such script; give the path of the Python file to run on every rank "
                          "(or -m MODULE, or -- PROGRAM ARGS for any other program)")
    interpreter = _shebang(path)
    if interpreter and "python" not in interpreter and path.suffix != ".py":  # a .py file is Python whatever its #!
        raise ConfigError(f"{req.script}: not a Python file (its first line is #!{interpreter}); run it as a program: "
                          f"orch run [OPTIONS] -- {req.script} [ARGS]")
    return str(path.resolve())


def _shebang(path: Path) -> str:
    """The interpreter a ``#!`` first line names ("" if none)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return ""
    return first[2:].decode("utf-8", "replace").strip() if first.startswith(b"#!") else ""


def _findable(program: str, req: RunRequest, hostfile: Hostfile) -> bool:
    """Whether a local rank can exec ``program`` (the command, or ``--python``) as ``execvp`` looks: PATH, or a
    path from its cwd."""
    env = dict(parse_env_assignment(e) for e in req.env) if req.env else {}
    if any("PATH" in h.env for h in hostfile.hosts) or any(e.split("=", 1)[0] == "PATH" for e in hostfile.envs):
        return True  # the hostfile changes the ranks' PATH: theirs to find
    if not req.cwd and any(h.cwd for h in hostfile.hosts):
        return True  # ranks start in their host's cwd: theirs to find
    if os.sep in program:
        path = Path(req.cwd or ".") / program
        return path.is_file() and os.access(path, os.X_OK)
    return shutil.which(program, path=env.get("PATH", os.environ.get("PATH", os.defpath))) is not None


def _need_ssh() -> None:
    try:
        import orchestrator.launch.ssh  # noqa: F401
    except ImportError as e:  # pragma: no cover - asyncssh is a hard dependency
        raise ConfigError(f"remote hosts need asyncssh ({e}); pip install asyncssh") from None


def _launcher_for(hostfile: Hostfile, req: RunRequest) -> Launcher:
    """Local ranks need no SSH; any remote host means every host goes over SSH."""
    if all(h.is_local for h in hostfile.hosts):
        return LocalLauncher()
    _need_ssh()
    from orchestrator.launch.ssh import SSHLauncher
    from orchestrator.remote.ssh import SSHOptions

    return SSHLauncher(hostfile, SSHOptions.from_args(req), stage=req.stage)


def _prepare(req: RunRequest, sink: Sink) -> tuple[Hostfile, JobPlan, RunDir, str, Optional["MPIInstall"]]:
    """Everything that can fail on bad input, before anything is created or started.

    The run directory comes last: it is created and locked (one run at a time
    per directory) only once everything else is known to be right.
    """
    check_values(req)
    hostfile = _load_cluster(req)
    choice = backends.choose(hostfile, req.backend)
    backend = choice.name
    kind = backends.get(backend)
    script = _check_script(req, hostfile)
    mpi = None
    if not kind.stdin_to_all and req.stdin == "all":
        raise ConfigError(f"--stdin all: under the {backend} backend only rank 0 can read orch's stdin (mpirun forwards "
                          "it to one rank; Open MPI 5's --stdin all fails); use --stdin rank0, or the ring backend")
    if req.resume_arg and not kind.stages_files and not all(h.is_local for h in hostfile.hosts):
        raise ConfigError(f"--resume-arg: under the {backend} backend remote hosts cannot be given the resume file "
                          "(mpirun stages nothing); use the ring backend over SSH, which copies it to every host")
    if kind.started_by_mpirun:
        from orchestrator.launch.mpi import find_mpi

        mpi = find_mpi(req.mpirun)  # fail early, naming what was searched
    elif not all(h.is_local for h in hostfile.hosts):
        _need_ssh()
    if req.cwd and not Path(req.cwd).is_dir():
        raise ConfigError(f"--cwd {req.cwd}: no such directory")
    for e in req.env:
        try:
            parse_env_assignment(e)
        except ValueError as err:
            raise ConfigError(f"--env: {err}") from None
    plan = plan_job(hostfile, backend, req.connections_per_ip, req.starting_port)
    if req.ring_order == "measured" and not kind.ring:
        raise ConfigError(f"--ring-order measured: only the ring backend has a ring order to choose (this run uses "
                          f"{plan.backend}); drop --ring-order or use --backend ring")
    if req.fallback_backend:
        if not kind.init_failures:
            raise ConfigError(f"--fallback-backend {req.fallback_backend}: only a jaccl or jaccl-ring run can fall back "
                              f"(this run uses {backend}); drop --fallback-backend")
        if req.max_restarts < 1:
            raise ConfigError("--fallback-backend: the fallback happens on a restart; add --max-restarts 1 (or more)")
        plan_job(hostfile, req.fallback_backend, req.connections_per_ip, None)  # the hosts must carry it: fail now, not mid-run
    if req.hostfile and not req.backend and not hostfile.backend and plan.world_size > 1:
        sink.say(f"backend {backend}: {choice.reason}")
    rundir = RunDir(req.run_dir or default_run_dir(script))
    rundir.lock()
    if not req.resume:
        moved = rundir.set_aside_previous()
        if moved is not None:
            sink.say(f"--run-dir held an earlier run: its summary, events and logs are now in {moved} "
                     "(checkpoints stay; --resume continues a run instead)")
    return hostfile, plan, rundir, script, mpi


def make_launcher(job: Job, plan: JobPlan, req: Optional[RunRequest] = None) -> Launcher:
    """The launcher of one attempt: mpirun for a backend it starts, else local or SSH."""
    req = req or job.req
    if backends.get(plan.backend).started_by_mpirun:
        from orchestrator.launch.mpi import MPILauncher, MPIOptions

        options = MPIOptions.of(mpirun=req.mpirun, mpi_args=req.mpi_args, ssh_config=req.ssh_config,
                                identity=req.identity)
        return MPILauncher(job.hostfile, options, job.rundir.path, job.mpi)
    return _launcher_for(job.hostfile, req)
