"""The run as a pipeline (``driver.py`` reads top to bottom): ``request.py`` (what was asked) ->
``resolve.py`` (an immutable ``Job``; the request ends there) -> ``ring_order.py`` (``--ring-order
measured``) -> ``attempt.py`` (specs -> launcher -> supervise -> collect) -> ``restart.py`` (resume,
fallback backend, exclude host, back-off)."""

from orchestrator.run.driver import run_job, run_job_async  # noqa: F401
from orchestrator.run.request import RunRequest, newest_match  # noqa: F401
