"""From a ``RunRequest`` to a finished run: load, plan, build rank specs, supervise.

The CLI only parses arguments into a ``RunRequest``; everything a run needs to
decide lives here, so tests and other front-ends can call ``run_job`` directly.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field

from orchestrator.hostfile import ConfigError, Hostfile, load_hostfile, local_hostfile, parse_env_assignment
from orchestrator.launch.base import Launcher, RankSpec
from orchestrator.launch.local import LocalLauncher
from orchestrator.plan import JobPlan, plan_job
from orchestrator.rundir import RunDir, RunSummary, default_run_dir
from orchestrator.supervisor import Supervisor, SupervisorOptions

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


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
    """Per rank: the guarded command line and the environment MLX expects."""
    extra_env = dict(parse_env_assignment(e) for e in req.env) if req.env else {}
    mlx_hostfile_path = None
    if plan.backend == "ring" and plan.world_size > 1:
        mlx_hostfile_path = rundir.path / "mlx-hostfile.json"
        mlx_hostfile_path.write_text(plan.mlx_hostfile_json() + "\n")
    specs = []
    for r in plan.ranks:
        host = hostfile.hosts[r.host_index]
        python = req.python or host.python or sys.executable
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env.update(hostfile.env)
        env.update(host.env)
        env.update(extra_env)
        env.update(
            PYTHONUNBUFFERED="1",
            MLX_RANK=str(r.rank),
            ORCH_EVENTS="1",
            ORCH_RUN_DIR=str(rundir.path),
            ORCH_BACKEND=plan.backend,
            ORCH_WORLD_SIZE=str(plan.world_size),
            ORCH_GRACE_S=str(req.grace),
        )
        if mlx_hostfile_path is not None:
            env["MLX_HOSTFILE"] = str(mlx_hostfile_path)
        else:
            env.pop("MLX_HOSTFILE", None)
        if r.gated:
            env["ORCH_GATED"] = "1"
        elif plan.backend == "ring" and plan.world_size > 1 and r.listen:
            env["ORCH_LISTEN"] = r.listen[0]
        argv = [python, "-m", "orchestrator.runtime.guard", "--", python, "-m", "orchestrator.runtime.bootstrap", script, *req.script_args]
        specs.append(RankSpec(rank=r.rank, host=r.host, argv=argv, env=env, cwd=req.cwd or host.cwd))
    return specs


def _launcher_for(hostfile: Hostfile) -> Launcher:
    remote = [h.name for h in hostfile.hosts if not h.is_local]
    if remote:
        raise ConfigError(
            f"{hostfile.path}: hosts {', '.join(remote)} are remote; this build runs local hosts only "
            "(127.0.0.1 / localhost)"
        )
    return LocalLauncher()


def prepare(req: RunRequest) -> tuple[Hostfile, JobPlan, Launcher, RunDir, str]:
    """Everything that can fail on bad input, before anything is created or started."""
    hostfile = _load_cluster(req)
    backend = req.backend or hostfile.backend or "ring"
    if backend not in ("ring", "mpi"):
        raise ConfigError(f"--backend {backend}: unknown backend; use ring or mpi")
    if backend == "mpi":
        raise ConfigError("--backend mpi is not available in this build yet; use --backend ring")
    launcher = _launcher_for(hostfile)
    if req.cwd and not Path(req.cwd).is_dir():
        raise ConfigError(f"--cwd {req.cwd}: no such directory")
    script = _check_script(req)
    for e in req.env:
        try:
            parse_env_assignment(e)
        except ValueError as err:
            raise ConfigError(f"--env: {err}") from None
    plan = plan_job(hostfile, backend, req.connections_per_ip, req.starting_port)
    rundir = RunDir(req.run_dir or default_run_dir(script))
    return hostfile, plan, launcher, rundir, script


async def run_job_async(req: RunRequest) -> RunSummary:
    hostfile, plan, launcher, rundir, script = prepare(req)
    specs = build_specs(req, hostfile, plan, rundir, script)
    rundir.write_json("plan.json", plan.model_dump(mode="json"))
    sup = Supervisor(plan, specs, launcher, rundir, script, SupervisorOptions(init_timeout=req.init_timeout, echo=req.echo))
    return await sup.run()


def run_job(req: RunRequest) -> RunSummary:
    return asyncio.run(run_job_async(req))
