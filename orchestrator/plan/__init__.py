"""Planning a job: which rank runs where, on which backend, with which addresses and ports.

* ``model.py``: ``JobPlan`` / ``RankPlan``, data only (``plan.json`` is one);
* ``planner.py``: ``plan_job`` (hostfile + backend -> plan, once per attempt), ports, per-job files;
* ``environment.py``: the one home of a rank's environment;
* ``ringstart.py``: the ring start, controller side (gated and held ranks, their lines);
* ``ringorder.py``: the fastest ring from measured links.
"""

from __future__ import annotations

from orchestrator.backends.ring import link_mode, listen_ips  # noqa: F401  (re-exported: older imports)
from orchestrator.plan.model import FILE_NAMES, JobPlan, RankPlan, file_name, file_text  # noqa: F401
from orchestrator.plan.planner import choose_ports, plan_job, write_files  # noqa: F401
