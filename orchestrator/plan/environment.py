"""The one home of a rank's environment: everything the controller hands a rank, assembled here.

In order, later ones winning: the hostfile's ``envs`` and the host's ``env``, ``--env``; what
``mlx.launch`` hands the rank for its backend plus torchrun's names (``JobPlan.rank_env``:
``MLX_RANK``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_*`` and the backend's variables); orch's own
``ORCH_*`` (``protocol.py`` names each); the ring start's part (``ringstart.rank_env``); and
``--bind`` / ``--stdin``. A launcher adapts it for the rank's host (``launch/ssh.remote_env``:
the remote copies of the per-job files and the run directory) and never adds a variable of its own.
"""

from __future__ import annotations

from typing import Iterable

from orchestrator import backends, protocol
from orchestrator.hostfile import Hostfile, parse_env_assignment
from orchestrator.plan import ringstart
from orchestrator.plan.model import JobPlan, RankPlan


def rank_environment(hostfile: Hostfile, plan: JobPlan, rank: RankPlan, paths: dict[str, str], *,
                     user_env: Iterable[str], run_dir: str, run_id: str, grace: float, bind: bool,
                     reads_stdin: bool) -> dict[str, str]:
    """What rank ``rank`` is started with (the launcher adds nothing but the host's own paths)."""
    host = hostfile.hosts[rank.host_index]
    kind = backends.get(plan.backend)
    env = {**hostfile.env, **host.env, **dict(parse_env_assignment(e) for e in user_env)}
    env.update(plan.rank_env(rank, paths))
    env.update({
        "PYTHONUNBUFFERED": "1",
        protocol.ENV_EVENTS: "1",
        protocol.ENV_RUN_DIR: run_dir,
        protocol.ENV_RUN_ID: run_id,  # checkpoint pruning deletes only this run's checkpoints
        protocol.ENV_BACKEND: plan.backend,
        protocol.ENV_WORLD_SIZE: str(plan.world_size),
        protocol.ENV_GRACE_S: str(grace),
        protocol.ENV_GUARD_RSS: "1",  # the guard samples every rank's memory, whatever the program
        protocol.ENV_HOST: rank.host,  # which ranks share a machine (runtime/quiet_wait.py); hostnames may repeat
    })
    if bind:
        index = sum(1 for r in plan.ranks[:rank.rank] if r.host_index == rank.host_index)  # among its entry's slots
        env[protocol.ENV_BIND] = f"{index}/{host.slots}"
    env.update(ringstart.rank_env(kind, rank))  # gated / held / the ring address the guard watches
    if reads_stdin:
        env[protocol.ENV_STDIN] = "pipe"  # the guard feeds this rank's stdin from orch's (--stdin)
    return env
