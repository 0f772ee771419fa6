"""From a ``RunRequest`` to a finished run: load, plan, build rank specs, supervise.

The CLI only parses arguments into a ``RunRequest``; everything a run needs to
decide lives here, so tests and other front-ends can call ``run_job`` directly.
"""

from __future__ import annotations

import asyncio
import glob
import io
import math
import os
import shlex
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import BaseModel, Field

from orchestrator import protocol
from orchestrator.plan import ringstart
from orchestrator import backends
from orchestrator.backends import choose
from orchestrator.hostfile import (ConfigError, Hostfile, hosts_hostfile, load_hostfile, local_hostfile, parse_env_assignment,
                                  select_hosts)
from orchestrator.launch.base import LaunchError, Launcher, RankSpec
from orchestrator.launch.local import LocalLauncher
from orchestrator.plan import JobPlan, plan_job, write_files
from orchestrator.rundir import PLAN, SUMMARY, AttemptSummary, RankSummary, RunDir, RunSummary, default_run_dir
from orchestrator.stdin_relay import StdinRelay, stdin_ranks
from orchestrator.supervisor import Supervisor, SupervisorOptions

if TYPE_CHECKING:
    from orchestrator.launch.mpi import MPIInstall


class RunRequest(BaseModel):
    script: str  # the program: a file path (script), a module name (module), or an executable (command)
    program: Literal["script", "module", "command"] = "script"
    script_args: list[str] = Field(default_factory=list)
    hosts: Optional[str] = None  # --hosts mac1,mac2 instead of a hostfile
    include: Optional[str] = None
    exclude: Optional[str] = None
    n: Optional[int] = None
    hostfile: Optional[str] = None
    backend: Optional[str] = None
    fallback_backend: Optional[str] = None
    env: list[str] = Field(default_factory=list)
    cwd: Optional[str] = None
    python: Optional[str] = None
    run_dir: Optional[str] = None
    init_timeout: float = 60.0
    grace: float = 1.0
    hang_timeout: float = 300.0
    hang_floor: float = 30.0
    first_step_timeout: float = 120.0
    max_restarts: int = 0
    exclude_failed_host: bool = False
    restart_backoff: float = 1.0
    connections_per_ip: int = 1
    starting_port: Optional[int] = None
    ring_order: Literal["hostfile", "measured"] = "hostfile"  # measured: the fastest ring over the hosts' links
    echo: bool = True
    bind: bool = False
    stdin: Literal["none", "rank0", "all"] = "none"  # which ranks read orch's stdin (the others: /dev/null)
    resume_from: Optional[str] = None  # --resume-from GLOB: what a restarted attempt resumes from (newest match)
    resume_arg: Optional[str] = None  # --resume-arg TEMPLATE: the words that hand it to the program, with {latest}
    resume: bool = False  # --resume: the first attempt continues the run in --run-dir as a restart would
    json_output: bool = False
    # A run inside another command (``orch check --collective``): nothing of it on the terminal, where that
    # command reports the result itself. No CLI option sets it.
    silent: bool = False
    # SSH (remote hosts)
    ssh_config: Optional[str] = None
    known_hosts: Optional[str] = None
    identity: list[str] = Field(default_factory=list)
    ssh_accept_new: bool = False
    connect_timeout: float = 10.0
    keepalive_s: float = 1.0
    stage: list[str] = Field(default_factory=list)
    # MPI
    mpirun: Optional[str] = None
    mpi_args: list[str] = Field(default_factory=list)


def check_values(req: RunRequest) -> None:
    """Numbers on the command line that would otherwise fail late, hang, or be silently ignored."""
    if req.starting_port is not None and not 1 <= req.starting_port <= 65535:
        raise ConfigError(f"--starting-port {req.starting_port}: not a TCP port; give one in 1-65535 (or leave it out)")
    positive = {"--init-timeout": req.init_timeout, "--hang-timeout": req.hang_timeout,
                "--hang-floor": req.hang_floor, "--first-step-timeout": req.first_step_timeout, "--grace": req.grace,
                "--connect-timeout": req.connect_timeout}
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value:g}: must be a positive number of seconds")
    if not (math.isfinite(req.restart_backoff) and req.restart_backoff >= 0):
        raise ConfigError(f"--restart-backoff {req.restart_backoff:g}: must be 0 or a positive number of seconds")
    if req.max_restarts < 0:
        raise ConfigError(f"--max-restarts {req.max_restarts}: must be 0 or more")
    if req.n is not None and req.n < 1:
        raise ConfigError(f"-n {req.n}: the number of ranks must be at least 1")
    if req.resume and not (req.run_dir and Path(req.run_dir).is_dir()):
        raise ConfigError(f"--resume: {'no run directory at ' + req.run_dir if req.run_dir else 'no --run-dir'}; give "
                          "--run-dir DIR, the run directory of the run to continue")
    resume_words(req)


def resume_words(req: RunRequest) -> list[str]:
    """--resume-arg's words (``{latest}`` still in them), after checking the pair of options makes sense."""
    if req.resume_arg is None and req.resume_from is None:
        return []
    if req.resume_arg is None:
        raise ConfigError("--resume-from: add --resume-arg TEMPLATE, the words that hand the file to the program "
                          "(e.g. --resume-arg '--resume-adapter-file {latest}')")
    if req.resume_from is None or not req.resume_from.strip():
        raise ConfigError("--resume-arg: add --resume-from GLOB, the files to resume from, relative to the run directory "
                          "(e.g. --resume-from 'adapters/*_adapters.safetensors')")
    try:
        words = shlex.split(req.resume_arg)
    except ValueError as e:
        raise ConfigError(f"--resume-arg {req.resume_arg!r}: {e}; quote the template as one argument") from None
    if not any("{latest}" in w for w in words):
        raise ConfigError(f"--resume-arg {req.resume_arg!r}: no {{latest}} in it; write where the file goes, "
                          "e.g. '--resume-adapter-file {latest}'")
    if req.max_restarts < 1 and not req.resume:
        raise ConfigError("--resume-arg: it is used when a failed attempt is restarted; add --max-restarts 1 (or more)")
    return words


def newest_match(pattern: str, base: Path) -> Optional[str]:
    """The newest regular file matching ``pattern`` (relative to ``base`` unless absolute; ``**`` recurses).

    Newest by modification time, then by name (zero-padded step numbers sort
    right when two files share a timestamp). An absolute path, so a rank with
    another working directory finds it.
    """
    full = os.path.expanduser(pattern)
    if not os.path.isabs(full):
        full = str(base / full)
    best: Optional[tuple[tuple[int, str], str]] = None
    for name in glob.glob(full, recursive=True):
        try:
            st = os.stat(name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (best is None or (st.st_mtime_ns, name) > best[0]):
            best = ((st.st_mtime_ns, name), name)
    return os.path.abspath(best[1]) if best else None


def _resume_arg_file(req: RunRequest, rundir: RunDir, attempt: int) -> tuple[Optional[str], str]:
    """A restart with --resume-arg: (the local file it resumes from, or None; a note for the summary).

    The launchers add the template's words to the program's arguments (see
    ``RankSpec.resume_words``): locally with this path, over SSH with the copy
    each host gets.
    """
    latest = newest_match(req.resume_from, rundir.path)
    if latest is None:
        note = (f"no file matched --resume-from {req.resume_from} (in {rundir.path}): attempt {attempt} started "
                "without --resume-arg")
        _say(req, note)
        return None, note
    words = [w.replace("{latest}", latest) for w in resume_words(req)]
    _say(req, f"attempt {attempt} resumes from {latest} ({' '.join(map(shlex.quote, words))})")
    return latest, f"resumed from {latest} (--resume-arg)"


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
    if req.program == "command":
        if all(h.is_local for h in hostfile.hosts) and not _findable(req, hostfile):
            raise ConfigError(f"-- {req.script}: no such program here (not on PATH, not a file); check the name, or "
                              "give its path")
        return req.script
    path = Path(req.script)
    if not path.is_file():
        raise ConfigError(f"{req.script}: no such script; give the path of the Python file to run on every rank "
                          "(or -m MODULE, or -- PROGRAM ARGS for any other program)")
    return str(path.resolve())


def _findable(req: RunRequest, hostfile: Hostfile) -> bool:
    """Whether a local rank can exec ``req.script`` (as ``execvp`` looks: PATH, or a path from its cwd)."""
    env = dict(parse_env_assignment(e) for e in req.env) if req.env else {}
    if any("PATH" in h.env for h in hostfile.hosts) or any(e.split("=", 1)[0] == "PATH" for e in hostfile.envs):
        return True  # the hostfile changes the ranks' PATH: theirs to find
    program = req.script
    if not req.cwd and any(h.cwd for h in hostfile.hosts):
        return True  # ranks start in their host's cwd: theirs to find
    if os.sep in program:
        path = Path(req.cwd or ".") / program
        return path.is_file() and os.access(path, os.X_OK)
    return shutil.which(program, path=env.get("PATH", os.environ.get("PATH", os.defpath))) is not None


def build_specs(req: RunRequest, hostfile: Hostfile, plan: JobPlan, rundir: RunDir, script: str) -> list[RankSpec]:
    """Per rank: what to run, and the environment MLX expects (launchers add the rest)."""
    extra_env = dict(parse_env_assignment(e) for e in req.env) if req.env else {}
    paths = write_files(plan, rundir.path)  # mlx-hostfile.json / mlx-ibv-devices.json, as mlx.launch writes them
    files = plan.files()
    specs = []
    local_index: dict[int, int] = {}
    for r in plan.ranks:
        host = hostfile.hosts[r.host_index]
        i = local_index[r.host_index] = local_index.get(r.host_index, -1) + 1
        env = {**hostfile.env, **host.env, **extra_env}
        env.update(plan.rank_env(r, paths))  # MLX_RANK, RANK, WORLD_SIZE, LOCAL_*, and the backend's own variables
        env.update({
            "PYTHONUNBUFFERED": "1",
            protocol.ENV_EVENTS: "1",
            protocol.ENV_RUN_DIR: str(rundir.path),
            protocol.ENV_RUN_ID: rundir.run_id,  # checkpoint pruning deletes only this run's checkpoints
            protocol.ENV_BACKEND: plan.backend,
            protocol.ENV_WORLD_SIZE: str(plan.world_size),
            protocol.ENV_GRACE_S: str(req.grace),
            protocol.ENV_GUARD_RSS: "1",  # the guard samples every rank's memory, whatever the program
            protocol.ENV_HOST: r.host,  # which ranks share a machine (runtime/quiet_wait.py); hostnames may repeat
        })
        if req.bind:
            env[protocol.ENV_BIND] = f"{i}/{host.slots}"
        env.update(ringstart.rank_env(plan.backend, r))  # gated / held / the ring address the guard watches
        if r.rank in stdin_ranks(req.stdin, plan.world_size):
            env[protocol.ENV_STDIN] = "pipe"  # the guard feeds this rank's stdin from orch's (--stdin)
        specs.append(RankSpec(
            rank=r.rank, host=r.host, host_index=r.host_index, script=script, program=req.program,
            script_args=list(req.script_args),
            python=req.python or host.python, env=env, cwd=req.cwd or host.cwd, mlx_hostfile_json=files.get("MLX_HOSTFILE"),
        ))
    return specs


def _launcher_for(hostfile: Hostfile, req: RunRequest) -> Launcher:
    """Local ranks need no SSH; any remote host means every host goes over SSH."""
    if all(h.is_local for h in hostfile.hosts):
        return LocalLauncher()
    try:
        from orchestrator.launch.ssh import SSHLauncher
        from orchestrator.remote.ssh import SSHOptions
    except ImportError as e:  # pragma: no cover - asyncssh is a hard dependency
        raise ConfigError(f"remote hosts need asyncssh ({e}); pip install asyncssh") from None
    return SSHLauncher(hostfile, SSHOptions.from_args(req), stage=req.stage)


def prepare(req: RunRequest) -> tuple[Hostfile, JobPlan, RunDir, str, Optional["MPIInstall"]]:
    """Everything that can fail on bad input, before anything is created or started.

    The run directory comes last: it is created and locked (one run at a time
    per directory) only once everything else is known to be right.
    """
    check_values(req)
    hostfile = _load_cluster(req)
    choice = choose(hostfile, req.backend)
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
    else:
        _launcher_for(hostfile, req)
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
        _say(req, f"backend {backend}: {choice.reason}")
    rundir = RunDir(req.run_dir or default_run_dir(script))
    rundir.lock()
    return hostfile, plan, rundir, script, mpi


def make_launcher(hostfile: Hostfile, req: RunRequest, plan: JobPlan, rundir: RunDir, mpi: Optional["MPIInstall"]) -> Launcher:
    if backends.get(plan.backend).started_by_mpirun:
        from orchestrator.launch.mpi import MPILauncher, MPIOptions

        options = MPIOptions.of(mpirun=req.mpirun, mpi_args=req.mpi_args, ssh_config=req.ssh_config,
                                identity=req.identity)
        return MPILauncher(hostfile, options, rundir.path, mpi)
    return _launcher_for(hostfile, req)


def _checkpoint_note(rundir: RunDir) -> Optional[str]:
    """Where a continued attempt resumes: the run directory's newest complete checkpoint (mlx-lm: its iteration)."""
    from orchestrator.runtime import checkpoint

    cp = checkpoint.latest_complete(rundir.checkpoints)
    if cp is None:
        return None
    return f"resumed from {'iteration' if 'mlx_lm' in cp.state else 'step'} {cp.step} ({cp.path})"


def _resume_args(req: RunRequest, rundir: RunDir) -> list[str]:
    """Restarts continue from the latest complete checkpoint when the script wrote one."""
    if "--resume" in req.script_args or not rundir.latest_checkpoint.exists():
        return list(req.script_args)
    return [*req.script_args, "--resume"]


async def _backoff(seconds: float) -> bool:
    """Sleep before a restart; False if the user interrupted meanwhile."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return False
    except asyncio.TimeoutError:
        return True
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_job_async(req: RunRequest) -> RunSummary:
    """Run the job; with --max-restarts, start it again from the last checkpoint after a failure."""
    hostfile, plan, rundir, script, mpi = prepare(req)
    try:
        if req.ring_order == "measured":
            measured = await _measured_ring(req, hostfile, plan, rundir, script)
            if isinstance(measured, RunSummary):  # could not measure: the run failed before it started
                return measured
            hostfile, plan = measured
        return await _run_attempts(req, hostfile, plan, rundir, script, mpi)
    finally:
        rundir.close()  # also releases the run directory's lock when interrupted


async def _run_attempts(req: RunRequest, hostfile: Hostfile, plan: JobPlan, rundir: RunDir, script: str,
                        mpi: Optional["MPIInstall"]) -> RunSummary:
    t0 = time.monotonic()
    attempts: list[AttemptSummary] = []
    summary: Optional[RunSummary] = None
    host_failures: dict[str, int] = {}
    backend = plan.backend
    fell_back: Optional[str] = None  # why the backend changed (--fallback-backend), for plan.json
    # --stdin: one reader of orch's stdin for every attempt (see stdin_relay.py).
    stdin_relay = StdinRelay() if req.stdin != "none" else None
    for attempt in range(req.max_restarts + 1):
        if attempt > 0:
            plan = plan_job(hostfile, backend, req.connections_per_ip, None).model_copy(update={"ring_order": plan.ring_order})
            if fell_back:
                plan.backend_reason = fell_back
            rundir.start_attempt(attempt)
        resumed_from: Optional[str] = None
        resume_note: Optional[str] = None
        continuing = attempt > 0 or req.resume  # a restart, or orch run --resume
        if continuing and req.resume_arg:
            script_args = list(req.script_args)
            resumed_from, resume_note = _resume_arg_file(req, rundir, attempt)
        else:
            script_args = _resume_args(req, rundir) if continuing else list(req.script_args)
            if "--resume" in script_args and "--resume" not in req.script_args:
                resume_note = _checkpoint_note(rundir)
            if req.resume and not attempt:
                _say(req, f"--resume: {resume_note or 'no complete checkpoint in the run directory: starting afresh'}")
        attempt_req = req.model_copy(update={"script_args": script_args})
        launcher = make_launcher(hostfile, attempt_req, plan, rundir, mpi)
        specs = build_specs(attempt_req, hostfile, plan, rundir, script)
        if resumed_from is not None:
            for spec in specs:
                spec.resume_words, spec.resume_file = resume_words(req), resumed_from
        rundir.write_json(PLAN, plan.model_dump(mode="json"))
        try:
            await launcher.prepare(specs)
        except LaunchError as e:
            await launcher.aclose()
            summary = _failed_before_start(req, plan, rundir, script, str(e))
        else:
            sup = Supervisor(plan, specs, launcher, rundir, script, out=sys.stderr if req.json_output else sys.stdout,
                             err=io.StringIO() if req.silent else sys.stderr, options=SupervisorOptions(
                init_timeout=req.init_timeout, echo=req.echo, hang_timeout=req.hang_timeout,
                hang_floor=req.hang_floor, first_step_timeout=req.first_step_timeout, attempt=attempt,
                # The guard SIGKILLs a rank that ignores SIGTERM after --grace; the controller's own
                # last resort comes only after that (a JACCL survivor spinning must get the full grace).
                stop_timeout=max(3.0, req.grace + 2.0),
                stdin_relay=stdin_relay, stdin_ranks=stdin_ranks(req.stdin, plan.world_size),
                # A rank waiting for typed input prints nothing and uses no CPU: not a hang.
                idle_watchdog=req.stdin == "none"))
            try:
                summary = await sup.run()
            finally:
                await launcher.collect(rundir.path)  # results home (SSH), whatever the outcome
                await launcher.aclose()
        cause = (attempts[-1].diagnosis or attempts[-1].reason) if attempts else None
        attempts.append(AttemptSummary(
            attempt=attempt, cause=cause, status=summary.status, exit_code=summary.exit_code, failed_rank=summary.failed_rank,
            reason=summary.reason, diagnosis=summary.diagnosis, started_at=summary.started_at,
            duration_s=summary.duration_s, note=resume_note,
            resumed=resumed_from is not None if req.resume_arg else "--resume" in attempt_req.script_args and continuing,
            backend=plan.backend, diagnosis_cause=summary.diagnosis_cause))
        if summary.status != "failed" or attempt == req.max_restarts:
            break
        fallback = _fallback_note(req, backend, summary, rundir.latest_checkpoint.exists())
        if fallback:
            backend = req.fallback_backend
            fell_back = f"--fallback-backend {backend}: JACCL failed to start in attempt {attempt} ({summary.diagnosis_cause})"
            _say(req, fallback)
            attempts[-1].note = f"{attempts[-1].note}; {fallback}" if attempts[-1].note else fallback
        if req.exclude_failed_host and summary.failed_rank is not None:
            hostfile, note = _exclude_twice_failed(hostfile, plan, summary.failed_rank, host_failures)
            if note:
                _say(req, note)
                attempts[-1].note = f"{attempts[-1].note}; {note}" if attempts[-1].note else note
        delay = min(30.0, req.restart_backoff * 2 ** attempt)
        sys.stderr.write(f"orch: restart {attempt + 1}/{req.max_restarts} in {delay:g}s"
                         f"{' from the latest checkpoint' if (rundir.checkpoints / 'latest.json').exists() else ''}\n")
        if not await _backoff(delay):
            summary = summary.model_copy(update={"status": "interrupted", "exit_code": 130})
            break
    summary = summary.model_copy(update={
        "attempts": attempts if req.max_restarts or req.resume else [], "restarts": len(attempts) - 1,
        "duration_s": round(time.monotonic() - t0, 3)})
    try:
        rundir.write_summary(summary)
    except OSError as e:  # a full disk at the very end: say so in one line; the exit code still tells the outcome
        _say(req, f"could not write {rundir.path / SUMMARY}: {e.strerror or e}")
    rundir.close()
    return summary


def _say(req: RunRequest, text: str) -> None:
    """One ``orch:`` line on stderr, unless the run is a silent inner run (``orch check --collective``)."""
    if not req.silent:
        sys.stderr.write(f"orch: {text}\n")


def _fallback_note(req: RunRequest, backend: str, summary: RunSummary, has_checkpoint: bool) -> Optional[str]:
    """--fallback-backend: an attempt that failed while JACCL was coming up restarts on (say) the ring.

    Only failures of JACCL's initialisation qualify (RDMA not enabled, a device
    missing, queue pairs that would not connect): a JACCL run that trained and
    then failed restarts on JACCL, as any other run would.
    """
    if not req.fallback_backend or summary.diagnosis_cause not in backends.get(backend).init_failures:
        return None
    start = "from the latest checkpoint" if has_checkpoint else "from the start (no checkpoint yet)"
    return (f"JACCL failed to start ({summary.diagnosis}); restarting on the {req.fallback_backend} backend over the same "
            f"hosts {start}")


async def _measured_ring(req: RunRequest, hostfile: Hostfile, plan: JobPlan, rundir: RunDir,
                         script: str) -> "tuple[Hostfile, JobPlan] | RunSummary":
    """--ring-order measured: measure every link between the hosts, put them in the order of the fastest ring.

    The ring all_sum runs at the speed of the ring's slowest link, so the order that maximises it is
    chosen (``ringorder.py``) and the hostfile re-planned in that order; the choice, the bottleneck
    and the whole link matrix go into plan.json. Hosts that cannot be reached, or no ring over
    working links, fail the run before anything starts (exit 1), as an unreachable host does.
    """
    from orchestrator.health.linkbw import measure_hostfile, needs_measuring
    from orchestrator.plan.ringorder import NoRingError, apply_order, choose_ring

    why_not = needs_measuring(hostfile)
    if why_not:
        _say(req, f"--ring-order measured: nothing to choose ({why_not}); keeping the hostfile's order")
        return hostfile, plan
    try:
        from orchestrator.remote.ssh import SSHOptions

        matrix = await measure_hostfile(hostfile, SSHOptions.from_args(req), python=req.python,
                                        timeout=max(5.0, min(req.connect_timeout, 30.0)))
        choice = choose_ring(matrix)
    except (ConfigError, NoRingError) as e:
        summary = _failed_before_start(req, plan, rundir, script, f"--ring-order measured: {e}")
        rundir.write_summary(summary)
        return summary
    _say(req, f"{choice.words()} (links measured in {matrix.seconds:.1f}s)")
    ordered = apply_order(hostfile, choice)
    new_plan = plan_job(ordered, plan.backend, req.connections_per_ip, req.starting_port)
    return ordered, new_plan.model_copy(update={"ring_order": choice.model_dump(mode="json")})


def _exclude_twice_failed(hostfile: Hostfile, plan: JobPlan, failed_rank: int,
                          counts: dict[str, int]) -> tuple[Hostfile, Optional[str]]:
    """--exclude-failed-host: drop a host that was the root cause twice; data parallel runs on with fewer ranks."""
    host = hostfile.hosts[plan.ranks[failed_rank].host_index]
    counts[host.name] = counts.get(host.name, 0) + 1
    if counts[host.name] < 2 or len(hostfile.hosts) < 2:
        return hostfile, None
    kept = [h for h in hostfile.hosts if h is not host]
    before, after = hostfile.world_size, sum(h.slots for h in kept)
    note = (f"excluding host {host.name} (root cause of two failures): world size {before} -> {after}; "
            "the global batch shrinks accordingly and the run resumes from the latest checkpoint")
    return hostfile.model_copy(update={"hosts": kept}), note


def _failed_before_start(req: RunRequest, plan: JobPlan, rundir: RunDir, script: str, reason: str) -> RunSummary:
    """Nothing started: say why, exit 1."""
    _say(req, f"could not start the run: {reason}")
    _say(req, f"failed; run directory {rundir.path}")
    return RunSummary(
        status="failed", exit_code=1, failed_rank=None, reason=reason, duration_s=0.0,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), script=script, backend=plan.backend,
        world_size=plan.world_size, run_dir=str(rundir.path),
        ranks=[RankSummary(rank=r.rank, host=r.host) for r in plan.ranks],
    )


def run_job(req: RunRequest) -> RunSummary:
    """Bad input (hostfile, values, a busy or impossible run directory) raises ``ConfigError`` before anything starts."""
    return asyncio.run(run_job_async(req))
