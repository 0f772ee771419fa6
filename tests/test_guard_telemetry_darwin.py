"""telemetry's macOS branch (``mx.metal.device_info()`` of MLX < 0.29, Metal memory counters under ``mx.metal``),
executed on Linux with a small stand-in for mlx.core that returns a real recorded device-info dict."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

from orchestrator.runtime import telemetry

RECORDED = Path(__file__).parent / "fixtures" / "macos" / "mx_metal_device_info__mlx_pr1060.txt"


def fake_mx(available: bool = True) -> types.SimpleNamespace:
    info = ast.literal_eval(RECORDED.read_text().strip())  # MLX PR 1060's printed dict (SOURCES.md section 4)
    metal = types.SimpleNamespace(
        is_available=lambda: available,
        device_info=lambda: info,
        get_active_memory=lambda: 1000,
        get_peak_memory=lambda: 3000,
        get_cache_memory=lambda: 500,
    )
    return types.SimpleNamespace(metal=metal)  # no mx.device_info, no mx.get_*_memory: an older MLX


def test_device_info_takes_the_metal_branch_on_darwin(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    info = telemetry.device_info(fake_mx())
    assert info["architecture"] == "applegpu_g14d"
    assert telemetry.metal_limits(info) == (None, 188743680000)


def test_device_info_is_empty_without_metal(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert telemetry.device_info(fake_mx(available=False)) == {}
    monkeypatch.setattr(sys, "platform", "linux")
    assert telemetry.device_info(fake_mx()) == {}  # the metal branch is macOS only


def test_a_memory_sample_from_the_metal_counters(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    sample = telemetry.MemorySampler(fake_mx()).sample(step=1)
    assert (sample["mlx_active_bytes"], sample["mlx_peak_bytes"], sample["mlx_cache_bytes"]) == (1000, 3000, 500)
    assert sample["metal_max_recommended_working_set_size"] == 188743680000
    assert sample["metal_memory_size"] is None
    assert sample["rss_bytes"] > 0
