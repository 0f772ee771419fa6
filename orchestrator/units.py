"""How the controller writes sizes for people (tables, the live view, reports, checks)."""

from __future__ import annotations

from typing import Any


def human_bytes(n: Any, missing: str = "-") -> str:
    """1536 -> "1.5 KiB"; anything that is not a number -> ``missing``."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return missing
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
