"""The token for guard-only events: read before the rank exists, on every guard event, never visible to the rank."""

from __future__ import annotations

import json
import secrets
import sys

from orchestrator import protocol
from tests.test_guard_support import start_guard  # noqa: F401 (fixture)

PY = sys.executable

# A hostile rank: prints everything it could learn about its guard, and a forged "spawned" event.
SNOOP = (
    "import json, os, sys\n"
    "seen = [json.dumps(dict(os.environ)), ' '.join(sys.argv)]\n"
    "for name in ('environ', 'cmdline'):\n"
    "    try:\n"
    "        seen.append(open(f'/proc/{os.getppid()}/{name}', 'rb').read().decode(errors='replace'))\n"
    "    except OSError as e:\n"
    "        seen.append(str(e))\n"
    "cfg = os.environ.get('ORCH_CONFIG_FD')\n"
    "if cfg:\n"
    "    seen.append(os.read(int(cfg), 65536).decode())\n"
    "print('seen', json.dumps(seen), flush=True)\n"
    "os.write(1, ('\\x1eORCH ' + json.dumps({'kind': 'spawned', 'rank': 0, 't': 0, 'pid': 1, 'host': 'x', 'token': 'f0f0'}) + '\\n').encode())\n"
)


def _guard_events(g) -> list[dict]:
    return [e for e in g.events() if e["kind"] in protocol.GUARD_KINDS]


def test_token_line_tags_every_guard_event_and_the_rank_never_sees_it(start_guard):
    token = secrets.token_hex(16)
    g = start_guard(PY, "-c", SNOOP, flags=("--token-line",), env={"ORCH_EVENTS": "1"})
    g.send(f"{protocol.CONTROL_TOKEN} {token}\n")
    assert g.finish(timeout=60) == 0
    seen = g.wait_text("seen ")
    assert token not in seen
    kinds = {e["kind"]: e for e in _guard_events(g) if e.get(protocol.TOKEN_FIELD) == token}
    assert set(kinds) == {"spawned", "exited"}, g.lines
    # The forged line is there, but with the rank's guess: only a matching token makes a guard event.
    forged = [e for e in _guard_events(g) if e.get(protocol.TOKEN_FIELD) != token]
    assert [e["pid"] for e in forged] == [1]
    assert sum(token in line for line in g.lines) == 2  # the guard's own two lines, nothing else


def test_without_the_token_line_the_rank_is_never_started(start_guard, tmp_path):
    marker = tmp_path / "started"
    g = start_guard(PY, "-c", f"open({str(marker)!r}, 'w').close()", flags=("--token-line",), env={"ORCH_EVENTS": "1"})
    g.proc.stdin.close()
    assert g.finish(timeout=60) == 1
    assert "token" in g.stderr()
    assert not marker.exists()
    assert g.events() == []


def test_a_malformed_token_line_is_refused(start_guard, tmp_path):
    marker = tmp_path / "started"
    g = start_guard(PY, "-c", f"open({str(marker)!r}, 'w').close()", flags=("--token-line",))
    g.send("go\n")
    assert g.finish(timeout=60) == 1
    assert not marker.exists()


def test_control_lines_sent_with_the_token_line_are_kept(start_guard):
    gate = "import os, select; fd = int(os.environ['ORCH_GATE_FD']); select.select([fd], [], [], 60); print('gate', os.read(fd, 16), flush=True)"
    g = start_guard(PY, "-c", gate, flags=("--token-line",), env={"ORCH_GATED": "1"})
    g.send("token 00ff\ngo\n")  # one write: the rest after the token line is control input
    assert "go" in g.wait_text("gate ")
    assert g.finish(timeout=60) == 0


def test_deferred_token_comes_in_the_configuration_and_is_not_relayed(start_guard):
    token = secrets.token_hex(16)
    g = start_guard(PY, "-c", SNOOP, flags=("--deferred",), env={"ORCH_EVENTS": "1"})
    g.send(json.dumps({"env": {"MLX_RANK": "2"}, "argv": [], "cwd": None, "token": token}) + "\n")
    assert g.finish(timeout=60) == 0
    seen = json.loads(g.wait_text("seen ").split(" ", 1)[1])
    assert token not in "".join(seen)
    assert json.loads(seen[-1]) == {"env": {"MLX_RANK": "2"}, "argv": [], "cwd": None}
    mine = [e for e in _guard_events(g) if e.get(protocol.TOKEN_FIELD) == token]
    assert {e["kind"] for e in mine} == {"spawned", "exited"} and all(e["rank"] == 2 for e in mine)


def test_without_a_token_guard_events_carry_none(start_guard):
    g = start_guard(PY, "-c", "pass", env={"ORCH_EVENTS": "1"})
    assert g.finish(timeout=60) == 0
    events = g.events()
    assert {e["kind"] for e in events} == {"spawned", "exited"}
    assert all(protocol.TOKEN_FIELD not in e for e in events)
