"""The one list of backends, importable from anywhere (the hostfile model, the CLI) without loading any."""

NAMES = ("ring", "mpi", "jaccl", "jaccl-ring", "nccl")  # what mlx.launch 0.32 launches
FALLBACKS = ("ring",)  # what a JACCL run may fall back to (--fallback-backend)


def local_ranks_prestartable(name: "str | None") -> bool:
    """Whether ``orch run -n N`` may start its ranks before planning (launch/prespawn.py): the default
    backend and the ring, whose local ranks the guard starts itself; cheap (no backend module imported)."""
    return name is None or name == "ring"
