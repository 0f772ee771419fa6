"""Memory samples: Metal limits from recorded macOS outputs, and fields that match the protocol."""

from __future__ import annotations

import ast
import time
import typing
from pathlib import Path

import pytest

from orchestrator import protocol
from orchestrator.runtime.telemetry import MemorySampler, Throughput, format_bytes, metal_limits

FIXTURES = Path(__file__).parent / "fixtures" / "macos"


def test_metal_limits_from_the_first_device_info_version():
    # MLX PR 1060's printed dict: only max_recommended_working_set_size, no memory_size yet.
    info = ast.literal_eval((FIXTURES / "mx_metal_device_info__mlx_pr1060.txt").read_text().strip())
    assert metal_limits(info) == (None, 188743680000)


def test_metal_limits_from_an_m3_max():
    # mlx-c PR 93's example prints "key: value" lines of the same device-info dict.
    info = {}
    for line in (FIXTURES / "mlx_device_info__m3max__mlxc_pr93_example.txt").read_text().splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep and key.isidentifier():
            info[key] = int(value) if value.isdigit() else value
    assert info["device_name"] == "Apple M3 Max"
    assert metal_limits(info) == (137438953472, 103079215104)


@pytest.mark.parametrize("info", [{}, {"architecture": "x86_64", "device_name": "AMD EPYC"},
                                  {"memory_size": "n/a", "max_recommended_working_set_size": -1},
                                  {"memory_size": True}])
def test_metal_limits_are_none_when_absent_or_nonsense(info):
    assert metal_limits(info) == (None, None)


def test_a_memory_sample_has_exactly_the_protocol_fields_and_sane_values():
    import mlx.core as mx

    sampler = MemorySampler()
    keep = mx.ones((256, 256))
    mx.eval(keep)
    sample = sampler.sample(step=3)
    expected = set(typing.get_type_hints(protocol.MemoryEvent)) - {"kind", "rank", "t"}
    assert set(sample) == expected
    assert sample["step"] == 3
    assert sample["mlx_active_bytes"] >= 256 * 256 * 4
    assert sample["mlx_peak_bytes"] >= sample["mlx_active_bytes"]
    assert sample["mlx_cache_bytes"] >= 0
    assert 10 * 2**20 < sample["rss_bytes"] < 64 * 2**30
    assert 0 < sample["system_available_bytes"]
    for key in expected - {"metal_memory_size", "metal_max_recommended_working_set_size"}:
        assert isinstance(sample[key], int), key


def test_sampling_is_cheap_enough_to_do_every_step():
    sampler = MemorySampler()
    started = time.perf_counter()
    for step in range(200):
        sampler.sample(step)
    per_sample = (time.perf_counter() - started) / 200
    assert per_sample < 1e-3, f"{per_sample * 1e6:.0f} us per sample"


def test_throughput_is_global_and_tokens_only_for_token_recipes():
    assert Throughput(64, None).rates(0.5) == (128.0, None)
    assert Throughput(64, 32).rates(0.5) == (128.0, 4096.0)


def test_format_bytes():
    assert format_bytes(None) == "-" and format_bytes(512) == "512 B" and format_bytes(3 * 2**30) == "3.0 GiB"
