"""Run a recipe with one rank inside a memory cgroup: ``in_memory_cgroup.py RECIPE ARGS...``.

``ORCH_TEST_MEMCG=RANK:DIR``: the rank whose ``MLX_RANK`` (0 without one) is
RANK writes its pid into ``DIR/cgroup.procs`` first, so it runs under that
cgroup's memory limit like a small Mac next to big ones; the others run as
they are. Then the recipe runs as ``__main__`` with the remaining arguments.
"""

import os
import runpy
import sys

rank, _, cgroup = os.environ.get("ORCH_TEST_MEMCG", "").partition(":")
if cgroup and int(rank) == int(os.environ.get("MLX_RANK") or 0):
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
recipe = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(recipe)))
runpy.run_path(recipe, run_name="__main__")
