"""Hostfile parsing: the formats users have, and one clear line for each mistake."""

import json
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
    ({"backend": "nccl", "hosts": [{"ssh": "a"}]}, "backend: backend 'nccl' is not supported"),
    ({"hosts": [{"ips": ["10.0.0.1"]}]}, "hosts[0]: missing 'ssh'"),
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
