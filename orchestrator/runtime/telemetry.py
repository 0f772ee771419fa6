"""Memory and throughput samples for the controller, at (almost) no cost.

Nothing here forces computation: MLX's memory counters and psutil's process
info are plain reads, so sampling never adds an ``mx.eval`` to a step. The
Metal limits (macOS only) come from ``mx.device_info()`` once per process.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

# Keys of ``mx.device_info()`` (``mx.metal.device_info()`` before MLX 0.29) on Apple silicon.
METAL_MEMORY_SIZE = "memory_size"
METAL_MAX_WORKING_SET = "max_recommended_working_set_size"


def _as_bytes(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def metal_limits(info: dict) -> tuple[Optional[int], Optional[int]]:
    """``(memory_size, max_recommended_working_set_size)`` in bytes from a device-info dict.

    Either is None when absent, e.g. on Linux, or with MLX < 0.13 whose
    ``device_info`` only had ``max_recommended_working_set_size``.
    """
    return _as_bytes(info.get(METAL_MEMORY_SIZE)), _as_bytes(info.get(METAL_MAX_WORKING_SET))


def device_info(mx: Any = None) -> dict:
    """MLX's device info dict, whichever API this MLX version has; ``{}`` if none.

    ``mx`` is ``mlx.core`` unless given (a test gives a stand-in to run the
    macOS branch, ``mx.metal.device_info()`` of MLX < 0.29, on Linux).
    """
    if mx is None:
        import mlx.core as mx

    try:
        if hasattr(mx, "device_info"):
            return dict(mx.device_info())
        if sys.platform == "darwin" and mx.metal.is_available():
            return dict(mx.metal.device_info())
    except Exception:  # a diagnostic must never take a training down
        pass
    return {}


def _mlx_memory(mx: Any, name: str) -> int:
    # MLX >= 0.24 has mx.get_*_memory; older versions had them under mx.metal.
    fn = getattr(mx, name, None) or getattr(getattr(mx, "metal", None), name, None)
    return int(fn()) if fn else 0


class MemorySampler:
    """Builds the fields of a ``memory`` event (``protocol.MemoryEvent``)."""

    def __init__(self, mx: Any = None) -> None:
        import psutil

        if mx is None:
            import mlx.core as mx

        self._mx = mx
        self._psutil = psutil
        self._process = psutil.Process()
        self.metal_memory_size, self.metal_max_working_set = metal_limits(device_info(mx))

    def sample(self, step: int) -> dict:
        mx = self._mx
        return {
            "step": step,
            "mlx_active_bytes": _mlx_memory(mx, "get_active_memory"),
            "mlx_peak_bytes": _mlx_memory(mx, "get_peak_memory"),
            "mlx_cache_bytes": _mlx_memory(mx, "get_cache_memory"),
            "rss_bytes": int(self._process.memory_info().rss),
            "system_available_bytes": int(self._psutil.virtual_memory().available),
            "metal_memory_size": self.metal_memory_size,
            "metal_max_recommended_working_set_size": self.metal_max_working_set,
        }


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # unreachable


class Throughput:
    """Per-step rates. Samples and tokens are *global* (all ranks), so any rank's event gives the job's rate."""

    def __init__(self, samples_per_step: int, tokens_per_sample: Optional[int]) -> None:
        self.samples_per_step = samples_per_step
        self.tokens_per_sample = tokens_per_sample

    def rates(self, step_time_s: float) -> tuple[float, Optional[float]]:
        dt = max(step_time_s, 1e-9)
        samples = self.samples_per_step / dt
        tokens = samples * self.tokens_per_sample if self.tokens_per_sample else None
        return samples, tokens
