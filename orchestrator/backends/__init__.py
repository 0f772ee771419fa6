"""The communication backends ``mlx.launch`` 0.32 starts: one ``Backend`` object each, and their one list.

* ``NAMES``: every backend orch launches, the one list (the hostfile model, the CLI's
  choices and ``orch check`` read it here);
* ``get(name)``: the ``Backend`` (``backends/base.py``: every question about a backend
  is a method or attribute there; nothing outside this package compares names);
* ``choose`` (``backends/choice.py``): picks one when neither ``--backend`` nor the
  hostfile names one, the way ``mlx.distributed_config`` decides.

This module imports nothing heavy (the CLI reads ``NAMES`` while parsing); each
backend's module is imported when it is first asked for.
"""

from __future__ import annotations

from orchestrator.backends.names import FALLBACKS, NAMES, local_ranks_prestartable  # noqa: F401  (the one list)
from orchestrator.backends.registry import all_backends, get  # noqa: F401

def choose(hostfile, requested=None):
    """``backends.choice.choose`` (kept here so callers import one name)."""
    from orchestrator.backends.choice import choose as _choose

    return _choose(hostfile, requested)
