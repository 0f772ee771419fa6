"""``--quiet-wait``: ranks of one machine wait for its slowest asleep before the all-reduce.

Integration tests run real ranks on MLX's ring backend (``tests.runtime_helpers.launch``) with
``tests/scripts/quiet_barrier.py``; "machines" are told apart by name, as ``ORCH_HOST`` does.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest

from orchestrator.runtime.quiet_wait import QuietBarrier, wanted
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
    ("auto", {"ORCH_HOST": "a", "ORCH_BACKEND": "mpi"}, 4, False),  # mpirun: one environment for all ranks
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


@pytest.mark.parametrize("case", ["broken", "nobind"])
def test_a_rendezvous_that_fails_anywhere_turns_the_wait_off_everywhere(tmp_path, case):
    seen = reports(launch(SCRIPT, 3, tmp_path, [case], extra_env={"QW_HOSTS": "m,m,m"}, timeout=90))
    assert all(s["failed"] and not s["active"] for s in seen), seen


def closed(s: socket.socket) -> bool:
    s.settimeout(10)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:  # closed with our bytes unread: a reset
        return True


def test_a_stray_connection_to_the_leaders_port_is_not_taken_for_a_rank():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    barrier = object.__new__(QuietBarrier)
    barrier._peers = []
    stray = socket.create_connection(("127.0.0.1", port))
    stray.sendall(b"GET / HTTP/1.0\r\n\r\n")
    wrong = socket.create_connection(("127.0.0.1", port))
    wrong.sendall(struct.pack("!ii", 41, 1))  # a wrong nonce
    ours = socket.create_connection(("127.0.0.1", port))
    ours.sendall(struct.pack("!ii", 42, 1))
    try:
        barrier._accept(server, 42, {1})
        assert len(barrier._peers) == 1
        assert closed(stray) and closed(wrong)  # both closed by the leader
        ours.sendall(b"r")  # and the one taken is the rank's own connection
        assert barrier._peers[0].recv(1) == b"r"
    finally:
        for s in (server, stray, wrong, ours, *barrier._peers):
            s.close()


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
    assert all("quiet_wait_ms_per_step" not in m and "quiet_wait_machine_ranks" not in m for m in metrics["off"])
    assert all(m["quiet_wait_ms_per_step"] >= 0 and m["quiet_wait_machine_ranks"] == 2 for m in metrics["auto"])
