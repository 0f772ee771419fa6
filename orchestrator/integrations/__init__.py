"""Rank-side integrations with programs orch does not own (mlx-lm's trainer, ...).

Everything here runs inside a rank, started by ``runtime/bootstrap.py`` right
before the user's program, so the same rule holds as for ``orchestrator/runtime``:
import only ``orchestrator.protocol`` and ``orchestrator.runtime.*``, never a
controller module, and never break a rank: an integration that cannot apply
itself says so in one ``orch:`` line and leaves the program as it is.
"""
