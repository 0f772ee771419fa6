"""``orch env``: for real on this machine (the JSON parses and names this MLX), and the macOS fields from real
recorded outputs fed to the same parsers (the host that combines them is SYNTHETIC: see SYNTHETIC.md)."""

from __future__ import annotations

import ast
import json
import subprocess

import mlx.core as mx

from orchestrator import __version__
from orchestrator.health.env import host_env, render_env
from tests.orch_helpers import ROOT, orch_argv
from tests.test_rdma_probes import FIX, IFCONFIG_BRIDGE, raw_mac


def run_env(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(orch_argv("env", *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_orch_env_here_json():
    p = run_env("--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["orch"] == __version__
    (h,) = out["hosts"]
    assert h["local"] and h["mlx"] == mx.__version__ and h["python"] and h["python_version"].count(".") == 2
    assert h["system"] == "Linux" and "macos" not in h and h["memory"]["total"] > 0


def test_orch_env_here_text_and_bad_hostfile(tmp_path):
    p = run_env()
    assert p.returncode == 0, p.stderr
    assert f"MLX:         {mx.__version__}" in p.stdout and "(this machine)" in p.stdout
    bad = tmp_path / "h.json"
    bad.write_text('{"hosts": [{"ssh": "a", "bogus": 1}]}')
    p = run_env("--hostfile", str(bad))
    assert p.returncode == 2 and p.stderr.startswith("orch: error: ") and "bogus" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_macos_fields_from_recordings():
    metal = ast.literal_eval((FIX / "mx_metal_device_info__mlx_pr1060.txt").read_text())
    rep = {"system": "Darwin", "machine": "arm64", "platform": "macOS-26.2-arm64-arm-64bit", "python": "/usr/bin/python3",
           "python_version": "3.12.8", "mlx": {"version": "0.32.4"}, "orch": "0.1.0", "metal": metal,
           "memory": {"total": 1, "available": 1}, "macos": raw_mac(ifconfig=IFCONFIG_BRIDGE)}
    h = host_env("studio", False, rep)
    mac = h["macos"]
    assert (mac["macos"], mac["build"], mac["rdma_ctl"]) == ("26.2", "25C56", "enabled")
    assert mac["ibv_devices"][:2] == ["rdma_en2", "rdma_en3"] and mac["bridge_members"] == ["en1", "en2", "en3", "en4"]
    (link,) = [l for l in mac["thunderbolt"] if l["peer"]]
    assert link == {"iface": "en2", "receptacle": "2", "speed": "80 Gb/s", "gbps": 80, "generation": "Thunderbolt 5",
                    "peer": "MacBook Pro (Mac17,7)", "error": None}
    assert h["metal"]["max_recommended_working_set_size"] == 188743680000 and h["metal"]["memory_size"] is None
    text = render_env([h, host_env("mac2", False, None, "cannot reach mac2: connection refused")])
    assert "macOS:       26.2 (25C56)" in text
    assert "en2 (port 2) 80 Gb/s Thunderbolt 5 -> MacBook Pro (Mac17,7)" in text
    assert "RDMA:        rdma_ctl enabled; ibv_devices: rdma_en2, rdma_en3" in text
    assert "bridge:      bridge0 members: en1, en2, en3, en4" in text
    assert "Metal:       working set limit 175.8 GiB" in text
    assert "error:       cannot reach mac2: connection refused" in text
    json.dumps(h)  # what --json prints


def test_unreadable_macos_output_is_named_not_guessed():
    raw = raw_mac()
    raw["rdma_ctl"] = {"rc": 0, "out": "disabled\n", "err": ""}
    raw["sp_thunderbolt"] = {"rc": None, "out": "", "err": "TimeoutExpired: system_profiler timed out"}
    h = host_env("m", False, {"system": "Darwin", "mlx": {}, "metal": {"error": "RuntimeError: no GPU"}, "macos": raw})
    text = render_env([h])
    assert "could not read rdma_ctl status output: 'disabled'" in text
    assert "Thunderbolt: system_profiler SPThunderboltDataType -json: TimeoutExpired" in text
    assert "Metal:       RuntimeError: no GPU" in text
