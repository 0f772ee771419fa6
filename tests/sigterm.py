"""A SIGTERM to pytest ends the suite the way Ctrl-C does: every fixture's and ``finally``'s cleanup runs.

Without this, a CI runner's timeout (SIGTERM) kills pytest mid-test and leaves what the running test
started: network namespaces, their sshd, memory cgroups, qdiscs, ranks. As ``KeyboardInterrupt`` the
signal unwinds the test's ``finally`` blocks, and pytest then tears down every fixture still set up.
"""

from __future__ import annotations

import signal


def _as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"pytest got signal {signum}: cleaning up")


def pytest_configure(config):
    signal.signal(signal.SIGTERM, _as_interrupt)
