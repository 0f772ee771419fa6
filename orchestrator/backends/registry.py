"""``get(name)``: the ``Backend`` object of a name, its module imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.backends.names import NAMES

if TYPE_CHECKING:
    from orchestrator.backends.base import Backend

_MODULES = {"ring": "ring", "mpi": "mpi", "jaccl": "jaccl", "jaccl-ring": "jaccl", "nccl": "nccl"}


def get(name: str) -> "Backend":
    """The backend called ``name``; a one-line ``ConfigError`` for a name that is none."""
    import importlib

    if name not in _MODULES:
        from orchestrator.hostfile import ConfigError

        raise ConfigError(f"--backend {name}: unknown backend; use one of {', '.join(NAMES)}")
    return importlib.import_module(f"orchestrator.backends.{_MODULES[name]}").BACKENDS[name]


def all_backends() -> list["Backend"]:
    return [get(n) for n in NAMES]
