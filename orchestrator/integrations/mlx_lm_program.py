"""Which program a rank runs, as mlx-lm's integrations see it: its LoRA trainer, and in which version.

Shared by ``mlx_lm_resume.py`` (exact restarts, for verified versions only) and
``mlx_lm_phases.py`` (validation as a phase, any version).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

VERIFIED = ("0.32.",)  # mlx-lm versions whose trainer loop exact restarts were checked against (bit-exact test)
_LORA_MODULES = ("mlx_lm.lora",)
_LORA_SCRIPTS = ("mlx_lm.lora",)


def say(text: str) -> None:
    """One ``orch:`` line on stderr (rank 0 only: every rank would say the same)."""
    if _rank() == 0:
        sys.stderr.write(f"orch: {text}\n")
        sys.stderr.flush()


def _rank() -> int:
    return int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("RANK") or 0)


# ----------------------------------------------------------------------------- which program, which version


def is_lora(kind: str, target: str, argv: list[str]) -> bool:
    """Whether the rank's program is mlx-lm's LoRA trainer, in any of its three spellings.

    ``-m mlx_lm lora`` (argv ``[mlx_lm, lora, ...]``), ``-m mlx_lm.lora``, or the
    ``mlx_lm.lora`` console script run in-process (bootstrap's kind ``script``).
    """
    if kind == "module":
        return target in _LORA_MODULES or (target == "mlx_lm" and len(argv) > 1 and argv[1] == "lora")
    if kind == "script":
        return os.path.basename(target) in _LORA_SCRIPTS
    return False


_version_cache: list[Optional[str]] = []


def installed_version() -> Optional[str]:
    """mlx-lm's version from its package metadata (no import of mlx-lm itself); looked up once."""
    if not _version_cache:
        from importlib import metadata

        found = None
        for name in ("mlx-lm", "mlx_lm"):
            try:
                found = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        _version_cache.append(found)
    return _version_cache[0]


def verified(version: Optional[str]) -> bool:
    return bool(version) and any(version.startswith(v) for v in VERIFIED)
