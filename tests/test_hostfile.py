"""Hostfile parsing: the formats users have, and one clear line for each mistake."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.hostfile import ConfigError, load_hostfile, parse_hostfile

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "hostfiles").glob("*.json"))


def write(tmp_path, data, name="hosts.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_mlx_format_with_backend_envs_rdma(tmp_path):
    hf = load_hostfile(write(tmp_path, {
        "backend": "ring", "envs": ["FOO=1", "BAR=a=b"],
        "hosts": [{"ssh": "m1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en3"]},
                  {"ssh": "m2", "ips": ["10.0.0.2"], "rdma": ["rdma_en3", None]}],
    }))
    assert hf.backend == "ring"
    assert [h.name for h in hf.hosts] == ["m1", "m2"]
    assert hf.env == {"FOO": "1", "BAR": "a=b"}
    assert hf.hosts[0].rdma == [None, "rdma_en3"]
    assert hf.world_size == 2


def test_bare_list_as_written_by_distributed_config(tmp_path):
    hf = load_hostfile(write(tmp_path, [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]))
    assert hf.backend is None and len(hf.hosts) == 2


def test_plain_form_and_optional_fields(tmp_path):
    hf = load_hostfile(write(tmp_path, {"hosts": [
        {"hostname": "gpu1", "local_ip": "192.168.1.5", "slots": 3, "user": "me", "port": 2222,
         "python": "/usr/bin/python3", "cwd": "/work", "env": {"A": "1"}},
    ]}))
    h = hf.hosts[0]
    assert (h.name, h.ips, h.slots, h.user, h.port, h.python, h.cwd, h.env) == (
        "gpu1", ["192.168.1.5"], 3, "me", 2222, "/usr/bin/python3", "/work", {"A": "1"})
    assert not h.is_local
    assert hf.world_size == 3


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_loads(path):
    hf = load_hostfile(path)
    assert hf.world_size >= 2


@pytest.mark.parametrize("content, expected", [
    ("{not json", "malformed JSON"),
    ({"backend": "ring"}, "missing required field 'hosts'"),
    ({"hosts": []}, "host list is empty"),
    ({"hosts": [{"ssh": "a", "ips": ["10.0.0.300"]}]}, "hosts[0].ips: '10.0.0.300' is not an IP address"),
    ({"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.1"]}]}, "hosts[1].ips: address 10.0.0.1 is also listed by hosts[0]"),
    ({"hosts": [{"ssh": "a", "slots": -1}]}, "hosts[0].slots: slots is -1"),
    ({"backend": "gloo", "hosts": [{"ssh": "a"}]}, "backend: backend 'gloo' is not supported"),
    ({"hosts": [{"ips": ["10.0.0.1"]}]}, "hosts[0]: missing 'ssh'"),
    ({"hosts": [{"ssh": "mac 1"}]}, "hosts[0].ssh: 'mac 1' is not a host name (it contains a space or a control character)"),
    ({"hosts": [{"ssh": "\n"}]}, "hosts[0].ssh: '\\n' is not a host name"),
    ({"hosts": [{"shh": "a"}]}, "hosts[0]: missing 'ssh' (or 'hostname'): the name to reach this host by (is 'shh' a misspelling of it?)"),
    ({"hosts": [{"ssh": "a", "slot": 2}]}, "hosts[0].slot: unknown field 'slot'"),
    ({"envs": ["NOEQUALS"], "hosts": [{"ssh": "a"}]}, "envs: 'NOEQUALS' is not an environment assignment"),
    ({"hosts": [{"ssh": "a", "port": 70000}]}, "hosts[0].port: port 70000 is out of range"),
])
def test_bad_hostfiles_give_one_line_naming_file_and_field(tmp_path, content, expected):
    p = write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        load_hostfile(p)
    msg = str(e.value)
    assert msg.startswith(str(p)), msg
    assert expected in msg, msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such hostfile"):
        load_hostfile(tmp_path / "nope.json")


def test_cli_bad_hostfile_exits_2_without_traceback(tmp_path):
    p = write(tmp_path, {"hosts": [{"ssh": "a", "ips": ["300.1.1.1"]}]})
    script = write(tmp_path, "print('hi')", "s.py")
    r = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(script), "--hostfile", str(p)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and "hosts[0].ips" in lines[0], r.stderr
    assert not (tmp_path / "runs").exists(), "a configuration error must not create a run directory"


def test_parse_hostfile_rejects_non_object():
    with pytest.raises(ConfigError, match="expected a JSON object"):
        parse_hostfile(42, "x.json")


# ----------------------------------------------------------------------------- files that are not hostfiles


def _one_line_error(path, expected):
    with pytest.raises(ConfigError) as e:
        load_hostfile(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    assert expected in msg, msg
    return msg


GOOD = {"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary, not JSON"),
    (b"\xff\xd8\xff\xe0 not utf8 at all", "is not UTF-8 text"),
    (json.dumps(GOOD).encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    (json.dumps(GOOD).encode("utf-16-le"), "is UTF-16 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"hosts": [{"ssh": "a", "slots": ' + b"9" * 5000 + b"}]}", "a number too long to read"),
    (b'{"hosts": [{"ssh": "a", "slots": true}]}', "hosts[0].slots: expected a whole number, got true"),
    (b'{"hosts": [{"ssh": "a", "slots": 2.5}]}', "hosts[0].slots: expected a whole number, got 2.5"),
    (b'', "the file is empty; a hostfile is JSON like"),
    (b' \n', "the file is empty"),
    (b'{"hosts": [{"ssh": "a", "slots": 100000}]}', "hosts[0].slots: slots is 100000; at most 1024"),
    (b'{"hosts": [{"ssh": "a", "port": false}]}', "hosts[0].port: expected a whole number, got false"),
    (b'{"hosts": [{"ssh": "a", "ips": "10.0.0.1"}]}', "hosts[0].ips: expected a list"),
    (b'{"hosts": [{"hostname": "a", "local_ip": "10.0.0.1", "ips": 5}]}', "expected a list of addresses"),
    (b'{"hosts": [{"ssh": "a", "ips": ["fe80::1"]}]}', "hosts[0].ips: 'fe80::1' is an IPv6 address, which MLX's ring"),
    (b'{"hosts": [{"ssh": "a", "ips": ["2001:db8::2/64"]}]}', "is an IPv6 address"),
    (b'{"hosts": [{"ssh": "a", "links": [{"peer": "b", "ip": "fe80::1%en0"}]}]}', "hosts[0].links[0].ip: 'fe80::1%en0' is an IPv6"),
    (b'{"hosts": [{"ssh": "a\\u0000b"}]}', "hosts[0].ssh: 'a\\x00b' contains a NUL character"),
    (b'{"hosts": [{"ssh": "a", "env": {"": "x"}}]}', "hosts[0].env: '=x' is not an environment assignment"),
    (b'{"hosts": [{"ssh": "a", "env": {"A": 1}}]}', "hosts[0].env.A: expected text, got 1"),
    (b'{"hosts": [{"ssh": "a", "sl\\not": 2}]}', "unknown field ''sl\\not''"),
])
def test_files_that_are_not_hostfiles_are_one_line(tmp_path, content, expected):
    p = tmp_path / "hosts.json"
    p.write_bytes(content)
    _one_line_error(p, expected)


def test_a_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "hosts.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    assert load_hostfile(p).world_size == 2


def test_a_directory_is_refused(tmp_path):
    _one_line_error(tmp_path, "is a directory")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    """Nothing writes to the FIFO: opening it for reading (without O_NONBLOCK) would block forever."""
    fifo = tmp_path / "hosts.json"
    os.mkfifo(fifo)
    _one_line_error(fifo, "is a named pipe (FIFO)")


def test_a_device_is_refused(tmp_path):
    _one_line_error(Path("/dev/zero"), "is a device")


def test_a_fifo_swapped_in_after_stat_is_refused_without_blocking(tmp_path, monkeypatch):
    """The race between stat and open: the open must not block and fstat must refuse what was opened."""
    import orchestrator.hostfile as hf_mod

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    regular = os.stat(write(tmp_path, GOOD))
    real_stat = os.stat
    monkeypatch.setattr(hf_mod.os, "stat", lambda p, *a, **k: regular if Path(p) == fifo else real_stat(p, *a, **k))
    _one_line_error(fifo, "is a named pipe (FIFO)")


def test_ipv6_loopback_is_refused_but_ipv4_loopback_is_fine(tmp_path):
    _one_line_error(write(tmp_path, {"hosts": [{"ssh": "localhost", "ips": ["::1"]}]}), "is an IPv6 address")
    assert load_hostfile(write(tmp_path, {"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"]}]})).hosts[0].is_local


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("case", ["ipv6", "fifo", "utf16", "slots-true", "deep", "digits"])
def test_run_and_check_refuse_the_same_bad_hostfiles(tmp_path, command, case):
    """Both commands go through one loader: same line, exit 2, no traceback, nothing started or created."""
    p = tmp_path / "hosts.json"
    if case == "fifo":
        os.mkfifo(p)
    else:
        p.write_bytes({
            "ipv6": json.dumps({"hosts": [{"ssh": "a", "ips": ["fd00::1"]}, {"ssh": "b", "ips": ["fd00::2"]}]}).encode(),
            "utf16": json.dumps(GOOD).encode("utf-16"),
            "slots-true": b'{"hosts": [{"ssh": "localhost", "slots": true}]}',
            "deep": b"[" * 50_000,
            "digits": b'{"hosts": [{"ssh": "a", "port": ' + b"1" * 5000 + b"}]}",
        }[case])
    script = write(tmp_path, "print('hi')", "s.py")
    argv = [str(script), "--hostfile", str(p)] if command == "run" else ["--hostfile", str(p)]
    r = subprocess.run([sys.executable, "-m", "orchestrator", command, *argv],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"orch: error: {p}: "), r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("n", [1, 2, 64])
def test_the_local_hostfile_is_what_validation_gives(n):
    """``-n N``'s hostfile is built without validating (model_construct, for launch speed): validating the
    same values must give the same hostfile, field by field and type by type."""
    from orchestrator.hostfile import Hostfile, local_hostfile

    built = local_hostfile(n)
    validated = Hostfile.model_validate(built.model_dump())
    assert validated == built and validated.model_dump() == built.model_dump()
    assert [(type(getattr(h, k)), k) for h in validated.hosts for k in type(h).model_fields] == \
        [(type(getattr(h, k)), k) for h in built.hosts for k in type(h).model_fields]
    assert built.hosts[0].is_local and built.hosts[0].slots == n
