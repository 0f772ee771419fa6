"""``--quiet-wait``: ranks of one machine wait for its slowest asleep before the all-reduce.

Integration tests run real ranks on MLX's ring backend (``tests.runtime_helpers.launch``) with
``tests/scripts/quiet_barrier.py``; "machines" are told apart by name, as ``ORCH_HOST`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.runtime.quiet_wait import wanted
from tests.runtime_helpers import RECIPES, latest_checkpoint, launch, load_arrays, max_abs_diff

SCRIPT = Path(__file__).parent / "scripts" / "quiet_barrier.py"


def reports(ranks) -> list[dict]:
    out = []
    for r in ranks:
        lines = [ln for ln in r.text.splitlines() if ln.startswith("QW ")]
        assert len(lines) == 1, r.text + r.stderr
        out.append(json.loads(lines[0][3:]))
    return out


@pytest.mark.parametrize("mode,env,world,expect", [
    ("off", {"ORCH_HOST": "a"}, 4, False),
    ("on", {}, 4, True),
    ("auto", {"ORCH_HOST": "a"}, 4, True),
    ("auto", {}, 4, False),  # not under orch run: nothing to tell machines apart by
    ("on", {"ORCH_HOST": "a"}, 1, False),  # one rank: no collective to wait for
    ("auto", {"ORCH_HOST": "a", "LOCAL_WORLD_SIZE": "1"}, 2, True),  # built everywhere; idle where alone
])
def test_every_rank_decides_to_build_the_barrier_alike(mode, env, world, expect):
    assert wanted(mode, world, env) is expect


def test_waiting_ranks_sleep_until_the_last_rank_of_their_machine_arrives(tmp_path):
    seen = reports(launch(SCRIPT, 3, tmp_path, ["wait"], extra_env={"QW_HOSTS": "m,m,m"}, timeout=60))
    assert [s["leader"] for s in seen] == [True, False, False] and all(s["active"] for s in seen)
    last = seen[2]["arrived"]
    for s in seen[:2]:
        assert s["returned"] >= last  # released only once the sleeper arrived
        # Asleep: MLX's ring would have spun a core for the whole 1.5 s wait.
        assert s["wait_cpu_s"] < 0.3 and s["wait_cpu_s"] < 0.5 * s["wait_wall_s"], s


def test_the_barrier_is_per_machine(tmp_path):
    """Ranks 0, 1 on machine a, 2, 3 on b; rank 3 waits for rank 0 to pass first, which a barrier
    spanning both machines would never allow (the script then fails after 30 s)."""
    seen = reports(launch(SCRIPT, 4, tmp_path, ["groups"], extra_env={"QW_HOSTS": "a,a,b,b"}, timeout=90))
    assert [s["leader"] for s in seen] == [True, False, True, False]
    assert all(s["active"] and not s["failed"] for s in seen)


def test_a_rank_alone_on_its_machine_has_nothing_to_wait_for(tmp_path):
    seen = reports(launch(SCRIPT, 2, tmp_path, ["alone"], extra_env={"QW_HOSTS": "a,b"}, timeout=60))
    assert all(s["leader"] and not s["active"] and not s["failed"] for s in seen)


def test_a_rendezvous_that_fails_anywhere_turns_the_wait_off_everywhere(tmp_path):
    seen = reports(launch(SCRIPT, 3, tmp_path, ["broken"], extra_env={"QW_HOSTS": "m,m,m"}, timeout=90))
    assert all(s["failed"] and not s["active"] for s in seen), seen


def test_training_with_the_quiet_wait_is_bit_identical(tmp_path):
    common = ["--samples", "512", "--hidden", "32", "--stats-every", "0", "--steps", "12", "--batch-size", "16"]
    params, metrics = {}, {}
    for mode in ("off", "auto"):
        ranks = launch(RECIPES / "mlp_regression.py", 2, tmp_path / mode, common + ["--quiet-wait", mode],
                       extra_env={"ORCH_HOST": "localhost"}, timeout=120)
        params[mode] = load_arrays(latest_checkpoint(tmp_path / mode))
        metrics[mode] = [r.of_kind("metric")[-1]["values"] for r in ranks]
    assert max_abs_diff(params["off"], params["auto"]) == 0.0
    # Each rank says how long a step waited for the slowest rank of its machine (only where it waited so).
    assert all("quiet_wait_ms_per_step" not in m for m in metrics["off"])
    assert all(m["quiet_wait_ms_per_step"] >= 0 for m in metrics["auto"])
