"""mlx-orch: a distributed-training orchestrator and launcher for MLX.

Two packages live here: the controller (everything at this level: cli, hostfile,
plan, launch, supervisor, rundir) and ``orchestrator.runtime``, which runs inside
each rank. They share only ``orchestrator.protocol``. Keep this file empty of
imports: ranks import ``orchestrator.runtime`` and must start fast.
"""

__version__ = "0.1.0"
