"""Host and link probes, shared by ``orch run`` (``--ring-order measured``) and ``orch check`` / ``orch env``.

* ``probe_host.py``: the probe program (standard library only), shipped as source to each host;
* ``runner.py``: runs it on a host, locally or over an SSH connection, bounded;
* ``probes.py``: its reports read back (ports, routes, interfaces, versions);
* ``macos.py``: parsers of macOS outputs, tested against real recordings;
* ``linkbw.py``: every link between the hosts measured, for the fastest ring.

This layer knows nothing of verdicts (``health/``) or of runs (``run/``): both import it.
"""
