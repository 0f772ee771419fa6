"""From a ``RunRequest`` to a finished run: load, plan, build rank specs, supervise.

The CLI only parses arguments into a ``RunRequest``; everything a run needs to
decide lives here, so tests and other front-ends can call ``run_job`` directly.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field

from orchestrator.hostfile import ConfigError, Hostfile, load_hostfile, local_hostfile, parse_env_assignment
from orchestrator.launch.base import LaunchError, Launcher, RankSpec
from orchestrator.launch.local import LocalLauncher
from orchestrator.plan import JobPlan, plan_job
from orchestrator.rundir import RankSummary, RunDir, RunSummary, default_run_dir
from orchestrator.supervisor import Supervisor, SupervisorOptions

class RunRequest(BaseModel):
    script: str
    script_args: list[str] = Field(default_factory=list)
    n: Optional[int] = None
    hostfile: Optional[str] = None
    backend: Optional[str] = None
    env: list[str] = Field(default_factory=list)
    cwd: Optional[str] = None
    python: Optional[str] = None
    run_dir: Optional[str] = None
    init_timeout: float = 60.0
    grace: float = 1.0
    connections_per_ip: int = 1
    starting_port: Optional[int] = None
    echo: bool = True
    bind: bool = False
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


def _load_cluster(req: RunRequest) -> Hostfile:
    if req.hostfile and req.n is not None:
        raise ConfigError("give either -n N (local ranks) or --hostfile FILE, not both")
    if req.hostfile:
        return load_hostfile(req.hostfile)
    return local_hostfile(req.n if req.n is not None else 1)


def _check_script(req: RunRequest) -> str:
    path = Path(req.script)
    if not path.is_file():
        raise ConfigError(f"{req.script}: no such script; give the path of the Python file to run on every rank")
    return str(path.resolve())


def build_specs(req: RunRequest, hostfile: Hostfile, plan: JobPlan, rundir: RunDir, script: str) -> list[RankSpec]:
    """Per rank: what to run, and the environment MLX expects (launchers add the rest)."""
    extra_env = dict(parse_env_assignment(e) for e in req.env) if req.env else {}
    mlx_json = None
    if plan.backend == "ring" and plan.world_size > 1:
        mlx_json = plan.mlx_hostfile_json()
        (rundir.path / "mlx-hostfile.json").write_text(mlx_json + "\n")
    specs = []
    local_index: dict[int, int] = {}
    for r in plan.ranks:
        host = hostfile.hosts[r.host_index]
        i = local_index[r.host_index] = local_index.get(r.host_index, -1) + 1
        env = {**hostfile.env, **host.env, **extra_env}
        if plan.backend != "mpi":  # under mpirun each rank knows its rank from Open MPI
            env["MLX_RANK"] = str(r.rank)
        env.update(
            PYTHONUNBUFFERED="1",
            ORCH_EVENTS="1",
            ORCH_RUN_DIR=str(rundir.path),
            ORCH_BACKEND=plan.backend,
            ORCH_WORLD_SIZE=str(plan.world_size),
            ORCH_GRACE_S=str(req.grace),
        )
        if mlx_json is not None:
            env["MLX_HOSTFILE"] = str(rundir.path / "mlx-hostfile.json")
        if req.bind:
            env["ORCH_BIND"] = f"{i}/{host.slots}"
        if r.gated:
            env["ORCH_GATED"] = "1"
        elif mlx_json is not None and r.listen:
            env["ORCH_LISTEN"] = r.listen[0]
        specs.append(RankSpec(
            rank=r.rank, host=r.host, host_index=r.host_index, script=script, script_args=list(req.script_args),
            python=req.python or host.python, env=env, cwd=req.cwd or host.cwd, mlx_hostfile_json=mlx_json,
        ))
    return specs


def _launcher_for(hostfile: Hostfile, req: RunRequest) -> Launcher:
    """Local ranks need no SSH; any remote host means every host goes over SSH."""
    if all(h.is_local for h in hostfile.hosts):
        return LocalLauncher()
    try:
        from orchestrator.launch.ssh import SSHLauncher
    except ImportError as e:  # pragma: no cover - asyncssh is a hard dependency
        raise ConfigError(f"remote hosts need asyncssh ({e}); pip install asyncssh") from None
    return SSHLauncher(hostfile, req)


def prepare(req: RunRequest) -> tuple[Hostfile, JobPlan, Launcher, RunDir, str]:
    """Everything that can fail on bad input, before anything is created or started."""
    hostfile = _load_cluster(req)
    backend = req.backend or hostfile.backend or "ring"
    if backend not in ("ring", "mpi"):
        raise ConfigError(f"--backend {backend}: unknown backend; use ring or mpi")
    script = _check_script(req)
    if backend == "mpi":
        from orchestrator.launch.mpi import find_mpi

        mpi = find_mpi(req.mpirun)  # fail early, naming what was searched
    else:
        launcher = _launcher_for(hostfile, req)
    if req.cwd and not Path(req.cwd).is_dir():
        raise ConfigError(f"--cwd {req.cwd}: no such directory")
    for e in req.env:
        try:
            parse_env_assignment(e)
        except ValueError as err:
            raise ConfigError(f"--env: {err}") from None
    plan = plan_job(hostfile, backend, req.connections_per_ip, req.starting_port)
    rundir = RunDir(req.run_dir or default_run_dir(script))
    if backend == "mpi":
        from orchestrator.launch.mpi import MPILauncher

        launcher = MPILauncher(hostfile, req, rundir.path, mpi)
    return hostfile, plan, launcher, rundir, script


async def run_job_async(req: RunRequest) -> RunSummary:
    hostfile, plan, launcher, rundir, script = prepare(req)
    specs = build_specs(req, hostfile, plan, rundir, script)
    rundir.write_json("plan.json", plan.model_dump(mode="json"))
    try:
        await launcher.prepare(specs)
    except LaunchError as e:
        await launcher.aclose()
        return _failed_before_start(req, plan, rundir, script, str(e))
    sup = Supervisor(plan, specs, launcher, rundir, script, SupervisorOptions(init_timeout=req.init_timeout, echo=req.echo))
    return await sup.run()


def _failed_before_start(req: RunRequest, plan: JobPlan, rundir: RunDir, script: str, reason: str) -> RunSummary:
    """Nothing started: say why, leave a summary, exit 1."""
    import time

    summary = RunSummary(
        status="failed", exit_code=1, failed_rank=None, reason=reason, duration_s=0.0,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), script=script, backend=plan.backend,
        world_size=plan.world_size, run_dir=str(rundir.path),
        ranks=[RankSummary(rank=r.rank, host=r.host) for r in plan.ranks],
    )
    rundir.write_summary(summary)
    rundir.close()
    sys.stderr.write(f"orch: could not start the run: {reason}\norch: failed; run directory {rundir.path}\n")
    return summary


def run_job(req: RunRequest) -> RunSummary:
    return asyncio.run(run_job_async(req))
