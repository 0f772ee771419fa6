"""Socket errno numbers -> words, for Linux and macOS numbering whatever this machine is.

Why a table and not ``os.strerror``: the number comes from *another* host (a probe's
report, a rank's ``[ring] Couldn't connect (error: 61)``), and Linux and macOS number
the same error differently (ECONNREFUSED is 111 on Linux, 61 on macOS). ``orch check``
and ``orchestrator.diagnose`` both word these errors; this is their one table.
"""

from __future__ import annotations

from typing import Optional

# errno name -> number, per system.
LINUX = {"EADDRINUSE": 98, "EADDRNOTAVAIL": 99, "ENETUNREACH": 101, "ECONNRESET": 104, "ETIMEDOUT": 110,
         "ECONNREFUSED": 111, "EHOSTUNREACH": 113}
DARWIN = {"EADDRINUSE": 48, "EADDRNOTAVAIL": 49, "ENETUNREACH": 51, "ECONNRESET": 54, "ETIMEDOUT": 60,
          "ECONNREFUSED": 61, "EHOSTUNREACH": 65}

# errno name -> words.
WORDS = {
    "ENETUNREACH": "network unreachable", "EHOSTUNREACH": "no route to host", "ECONNREFUSED": "connection refused",
    "ETIMEDOUT": "timed out", "EADDRINUSE": "address already in use", "EADDRNOTAVAIL": "address not available",
    "ECONNRESET": "connection reset",
}

# What a rank's failed connect means, where the bare words do not say it (used by diagnose).
HINTS = {"ECONNREFUSED": "nobody listening there"}


def errname(num: Optional[int], system: str) -> Optional[str]:
    """errno number -> symbolic name in ``system``'s numbering ("Darwin" or anything else: Linux)."""
    if num is None:
        return None
    table = DARWIN if system == "Darwin" else LINUX
    return next((name for name, n in table.items() if n == num), None)


def words(num: Optional[int], system: str, default: Optional[str] = None) -> Optional[str]:
    """errno number -> words in ``system``'s numbering, else ``default``."""
    return WORDS.get(errname(num, system) or "", default)


def _either_numbering() -> dict[int, str]:
    """Number -> words with the hint, both numberings in one dict: they do not overlap, so a rank's message
    can be worded without knowing its host's system (what ``orchestrator.diagnose`` needs)."""
    out = {}
    for table in (LINUX, DARWIN):
        for name, n in table.items():
            out[n] = WORDS[name] + (f": {HINTS[name]}" if name in HINTS else "")
    return out


# What orchestrator.diagnose words a rank's errno with.
BY_NUMBER = _either_numbering()
