"""runtime/allocator.py: every platform branch, and the real glibc call on this Linux box."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.runtime import allocator


class FakeLibc:
    """Records mallopt calls; answers ``result`` (glibc returns 1 on success, 0 on error)."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_darwin_leaves_metal_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    libc = FakeLibc()
    assert "Metal" in allocator.keep_freed_memory(libc)
    assert libc.calls == []


def test_other_systems_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "freebsd14")
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc).startswith("freebsd14")
    assert libc.calls == []


def test_linux_sets_every_parameter(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    libc = FakeLibc()
    assert "keeps freed" in allocator.keep_freed_memory(libc)
    assert libc.calls == list(allocator.SETTINGS)
    assert dict(libc.calls)[allocator.M_MMAP_THRESHOLD] == 32 * 1024 * 1024


def test_linux_says_when_glibc_refuses(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert "refused" in allocator.keep_freed_memory(FakeLibc(result=0))


def test_linux_without_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() == "not glibc: left to the system allocator"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_real_glibc_keeps_a_freed_block():
    """In a fresh process: after the call, a freed 8 MiB block comes back at the same address (heap reuse);
    before it, glibc serves 8 MiB with mmap and returns it to the kernel on free."""
    probe = (
        "import ctypes, sys\n"
        "from orchestrator.runtime.allocator import keep_freed_memory\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "def in_heap(n):\n"
        "    p = libc.malloc(n); maps = open('/proc/self/maps').read().splitlines(); libc.free(p)\n"
        "    heap = [l for l in maps if l.endswith('[heap]')]\n"
        "    lo, hi = (int(x, 16) for x in heap[0].split()[0].split('-')) if heap else (0, 0)\n"
        "    return lo <= p < hi\n"
        "before = in_heap(8 << 20)\n"
        "note = keep_freed_memory()\n"
        "print(before, in_heap(8 << 20), note)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    before, after, note = out.stdout.split(" ", 2)
    assert (before, after) == ("False", "True"), out.stdout
    assert "keeps freed" in note
