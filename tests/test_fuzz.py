"""Property-based fuzzing of the two places that parse what others wrote.

* The hostfile loader takes any bytes and any JSON-ish structure and gives a
  validated model or one ``ConfigError`` line, never another exception (a
  traceback is what a user would see).
* ``protocol.split_line`` takes any line a rank printed, including the event
  marker followed by garbage, nested or huge JSON, and returns a
  ``(text, payload)`` pair without raising and without losing user text.

Example counts stay modest so the suite stays fast; hypothesis still shrinks any
failure to a small reproducer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import protocol
from orchestrator.hostfile import ConfigError, Hostfile, load_hostfile, parse_hostfile
from orchestrator.plan import listen_ips

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- hostfiles

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["10.0.0.1", "10.0.0.1/30", "fe80::1", "::1", "127.0.0.1", "localhost", "ring", "mpi",
                     "A=1", "=x", "a\x00b", "300.1.1.1", "", "rdma_en3"]),
)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)
_HOST_KEYS = ["ssh", "hostname", "name", "ips", "local_ip", "rdma", "slots", "user", "port", "python", "cwd", "env", "links"]
_host = st.one_of(
    st.dictionaries(st.sampled_from(_HOST_KEYS), _json, max_size=6),
    st.fixed_dictionaries({"ssh": st.text(max_size=10)}, optional={k: _json for k in _HOST_KEYS[3:]}),
    _json,
)
_hostfile_like = st.one_of(
    st.fixed_dictionaries({"hosts": st.lists(_host, max_size=4)},
                          optional={"backend": _json, "envs": _json, "path": _json, "extra": _json}),
    st.lists(_host, max_size=4),
    _json,
)


def _exercise(hf: Hostfile) -> None:
    """What the controller does with a loaded hostfile must not raise either (beyond ConfigError)."""
    assert isinstance(hf, Hostfile) and hf.world_size >= 1
    for h in hf.hosts:
        h.bare_ips, h.is_local  # noqa: B018 - properties that parse the addresses again
    hf.env
    if hf.world_size <= 64:
        try:
            listen_ips(hf.hosts, [i for i, h in enumerate(hf.hosts) for _ in range(h.slots)])
        except ConfigError as e:
            assert "\n" not in str(e)


def _model_or_one_line(load) -> None:
    try:
        hf = load()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return
    _exercise(hf)


@FUZZ
@given(_hostfile_like)
def test_parse_hostfile_any_structure(data):
    _model_or_one_line(lambda: parse_hostfile(data, "fuzz.json"))


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    _hostfile_like.map(lambda d: json.dumps(d).encode()),
    _hostfile_like.map(lambda d: b"\xef\xbb\xbf" + json.dumps(d, ensure_ascii=False).encode()),
    _hostfile_like.map(lambda d: json.dumps(d).encode("utf-16")),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=6000).map(lambda n: b'{"hosts": [{"ssh": "a", "slots": ' + b"7" * n + b"}]}"),
))
def test_load_hostfile_any_bytes(content):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "hosts.json"
        p.write_bytes(content)
        _model_or_one_line(lambda: load_hostfile(p))


def test_the_fuzzer_reaches_both_outcomes():
    """Guard against a strategy that only ever produces errors (the property would then be vacuous)."""
    assert parse_hostfile([{"ssh": "a", "ips": ["10.0.0.1"]}], "x").world_size == 1
    try:
        parse_hostfile({"hosts": [{"ssh": "a", "slots": True}]}, "x")
    except ConfigError as e:
        assert "slots" in str(e)
    else:
        raise AssertionError("slots: true must be refused")


# ----------------------------------------------------------------------------- protocol.split_line

_payloads = st.one_of(
    st.text(max_size=200),
    _json.map(json.dumps),
    st.dictionaries(st.text(max_size=5), _json, max_size=5).map(lambda d: json.dumps({"kind": "step", **d})),
    st.integers(min_value=1, max_value=5000).map(lambda n: '{"kind": "x", "a": ' + "[" * n + "]" * n + "}"),
    st.integers(min_value=1, max_value=5000).map(lambda n: '{"kind": "x", "a": ' + "9" * n + "}"),
    st.integers(min_value=60_000, max_value=70_000).map(lambda n: json.dumps({"kind": "step", "pad": "x" * n})),
)


@FUZZ
@given(st.text(max_size=50), _payloads, st.sampled_from(["", "\n", " \n", "\r\n"]))
def test_split_line_never_raises_and_never_loses_user_text(prefix, payload, end):
    for line in (prefix + end, prefix + protocol.MARKER + payload + end, protocol.MARKER + payload + end):
        text, event = protocol.split_line(line)
        if event is None:
            assert text == line, "a line that is not an event is user text, whole"
        else:
            assert isinstance(event, dict) and isinstance(event.get("kind"), str)
            before = line[: line.rfind(protocol.MARKER)]
            assert (text or "") == before, "the text before the marker is kept"
            assert json.loads(line[len(before) + len(protocol.MARKER):]) == event


@FUZZ
@given(st.text(max_size=300))
def test_split_line_any_text(line):
    text, event = protocol.split_line(line)
    if protocol.MARKER not in line:
        assert (text, event) == (line, None)
    elif event is None:
        assert text == line
