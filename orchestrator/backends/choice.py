"""Which backend a run uses: ``--backend`` first, then the hostfile's ``backend``, then what its
``rdma`` matrix allows, as ``mlx.distributed_config`` decides what to write: a full RDMA mesh ->
``jaccl``, an RDMA ring -> ``jaccl-ring``, otherwise ``ring``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orchestrator.backends.registry import get
from orchestrator.hostfile import Hostfile


@dataclass(frozen=True)
class BackendChoice:
    """Internal, never read from or written to a file: a plain dataclass (no validator to build on the launch path)."""

    name: str
    reason: str  # one line the CLI prints: why this backend


def choose(hostfile: Hostfile, requested: Optional[str] = None) -> BackendChoice:
    """``--backend`` first, then the hostfile's ``backend``, then what its ``rdma`` matrix allows."""
    from orchestrator.backends import jaccl

    if requested:
        get(requested)  # an unknown name is a one-line error
        return BackendChoice(name=requested, reason=f"--backend {requested}")
    if hostfile.backend:
        return BackendChoice(name=hostfile.backend, reason=f"the hostfile names backend \"{hostfile.backend}\"")
    n = len(hostfile.hosts)
    if hostfile.world_size < 2 or not any(h.rdma for h in hostfile.hosts):
        return BackendChoice(name="ring", reason="no backend named and no rdma matrix in the hostfile: ring over TCP")
    problem = jaccl.matrix_problem(hostfile)
    if problem:
        return BackendChoice(name="ring", reason=f"no backend named and the rdma matrix is unusable ({problem}): ring over TCP")
    mesh_missing = jaccl.missing_pairs(hostfile, ring=False)
    if not mesh_missing:
        return BackendChoice(name="jaccl", reason=f"no backend named; the rdma matrix links every pair of the {n} hosts (full mesh): jaccl")
    if not jaccl.missing_pairs(hostfile, ring=True):
        return BackendChoice(name="jaccl-ring", reason=(
            f"no backend named; the rdma matrix links each host to its ring neighbours but not every pair "
            f"({jaccl.describe_pairs(hostfile, mesh_missing)} missing): jaccl-ring"))
    return BackendChoice(name="ring", reason=(
        f"no backend named; the rdma matrix forms neither a full mesh nor a ring "
        f"({jaccl.describe_pairs(hostfile, jaccl.missing_pairs(hostfile, ring=True))} missing): ring over TCP"))
