"""runtime/allocator.py: every platform branch, and the real glibc call on this Linux box."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.runtime import allocator


IN_HEAP = (
    "import ctypes\n"
    "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
    "def in_heap(n):\n"
    "    p = libc.malloc(n); maps = open('/proc/self/maps').read().splitlines(); libc.free(p)\n"
    "    heap = [l for l in maps if l.endswith('[heap]')]\n"
    "    lo, hi = (int(x, 16) for x in heap[0].split()[0].split('-')) if heap else (0, 0)\n"
    "    return lo <= p < hi\n"
)  # a fresh process's probe: does glibc serve a block of n bytes from the heap (kept), or by mmap?


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
    before, after, note = _in_heap_before_and_after(
        "from orchestrator.runtime.allocator import keep_freed_memory\n"
        "before = in_heap(8 << 20)\n"
        "note = keep_freed_memory()\n")
    assert (before, after) == ("False", "True"), (before, after, note)
    assert "keeps freed" in note


def _in_heap_before_and_after(setup: str) -> tuple[str, str, str]:
    """Run ``setup`` (which leaves ``before`` and ``note``) in a fresh process; then whether a freed 8 MiB
    block comes back from the heap, as the words ("True"/"False") the probe printed, and the note."""
    probe = IN_HEAP + setup + "print(before, in_heap(8 << 20), note)\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    before, after, note = out.stdout.split(" ", 2)
    return before, after, note


class TrimLibc:
    def __init__(self, released: int) -> None:
        self.released, self.calls = released, []

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(pad)
        return self.released


def test_return_freed_memory_calls_malloc_trim_once():
    libc = TrimLibc(released=1)
    assert allocator.return_freed_memory(libc) is True
    assert libc.calls == [0]
    assert allocator.return_freed_memory(TrimLibc(released=0)) is False


@pytest.mark.parametrize("platform", ["darwin", "freebsd14"])
def test_return_freed_memory_is_a_no_op_off_linux(monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("no C library is looked up off Linux"))
    assert allocator.return_freed_memory() is False


def test_return_freed_memory_without_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.return_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_real_glibc_gives_kept_blocks_back():
    """With freed blocks kept, 64 MiB freed in 8 MiB pieces stays resident until return_freed_memory()."""
    probe = (
        "import ctypes\n"
        "from orchestrator.runtime.allocator import keep_freed_memory, return_freed_memory\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "keep_freed_memory()\n"
        "ps = [libc.malloc(8 << 20) for _ in range(8)]\n"
        "[libc.memset(p, 1, 8 << 20) for p in ps]\n"
        "full = rss(); [libc.free(p) for p in reversed(ps)]\n"
        "kept = rss(); back = return_freed_memory()\n"
        "print(full, kept, rss(), back)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    full, kept, trimmed, back = out.stdout.split()
    assert int(kept) > int(full) - (8 << 20), out.stdout  # freed but kept
    assert int(trimmed) < int(kept) - (48 << 20), out.stdout  # given back
    assert back == "True"


class FakeTrimLibc(FakeLibc):
    def __init__(self) -> None:
        super().__init__()
        self.trimmed = 0

    def malloc_trim(self, pad: int) -> int:
        self.trimmed += 1
        return 1


def test_stopping_puts_glibcs_values_back_and_trims(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    libc = FakeTrimLibc()
    assert allocator.stop_keeping_freed_memory(libc) == "freed memory goes back to the system"
    assert libc.calls == list(allocator.DEFAULTS) and libc.trimmed == 1


@pytest.mark.parametrize("platform", ["darwin", "linux-without-glibc"])
def test_stopping_elsewhere_does_nothing(monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform.split("-")[0])
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.stop_keeping_freed_memory() == "nothing to undo here"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_real_glibc_gives_a_freed_block_back_after_stopping():
    """In a fresh process: kept, a freed 8 MiB block stays in the heap; after stopping, glibc serves it by
    mmap again (and returns it on free)."""
    kept, after, note = _in_heap_before_and_after(
        "from orchestrator.runtime.allocator import keep_freed_memory, stop_keeping_freed_memory\n"
        "keep_freed_memory(); before = in_heap(8 << 20)\n"
        "note = stop_keeping_freed_memory()\n")
    assert (kept, after) == ("True", "False"), (kept, after, note)
    assert "goes back" in note
