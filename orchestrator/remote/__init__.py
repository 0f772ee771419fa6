"""Everything that reaches another machine over SSH, in one place.

* ``ssh.py``: ``SSHOptions`` (what ``orch run``, ``orch check``, ``orch env`` and
  ``orch hostfile`` all take) and the one way to connect to a host, with the one
  wording of why a host could not be reached;
* ``sites.py``: the remote run layout (``~/.cache/mlx-orch``): sites, run ids,
  retiring and purging run directories, what a restart re-stages;
* ``manifest.py``: what gets staged, seen locally (files and their SHA-256, the hash cache);
* ``stager.py``: one host's content-addressed object store, checked by hash, and a run's
  own copies; it ships ``stage_helper.py``, the program that does that on the host;
* ``staging.py``: one run's staging of a host (its paths, the runtime, each site's code and inputs);
* ``collect.py``: results home, without trusting the names the remote sends.

``add_ssh_arguments`` lives here, not in ``ssh.py``: the command line is parsed
on every ``orch run``, local ones included, and must not import asyncssh
(~0.5 s) or pydantic to do it.
"""

from __future__ import annotations

import argparse

DEFAULT_CONNECT_TIMEOUT = 10.0
REMOTE_BASE = ".cache/mlx-orch"  # everything orch keeps on a host, under the remote user's home (sites.py)


def add_ssh_arguments(p: argparse.ArgumentParser, *, connect_timeout: bool = True) -> argparse._ArgumentGroup:
    """The SSH options every command that reaches hosts takes, worded once.

    ``connect_timeout=False`` for commands whose ``--timeout`` bounds the connect too (``orch check``, ``orch env``).
    """
    ssh = p.add_argument_group("remote hosts (SSH)")
    ssh.add_argument("--ssh-config", help="OpenSSH client config to honour (default ~/.ssh/config)")
    ssh.add_argument("--known-hosts", help="known_hosts file to verify host keys against (default ~/.ssh/known_hosts)")
    ssh.add_argument("-i", "--identity", action="append", default=[], help="private key file (repeatable)")
    ssh.add_argument("--ssh-accept-new", action="store_true",
                     help="trust unknown host keys on first use and record them (like OpenSSH's accept-new); "
                          "changed keys are still refused")
    if connect_timeout:
        ssh.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                         help=f"seconds to reach each host (default {DEFAULT_CONNECT_TIMEOUT:g})")
    return ssh
