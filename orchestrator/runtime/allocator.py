"""Keep freed buffers for reuse on Linux, as Metal's buffer cache does on macOS.

Why: on macOS MLX allocates from Metal and keeps freed buffers in its own
cache, so a training step reuses last step's gradient and activation memory.
MLX's CPU build on Linux calls ``malloc``/``free`` directly, and glibc hands
any block above its mmap threshold (128 KiB, growing to at most 32 MiB) back
to the kernel on ``free`` and trims the heap's top, so every step maps fresh
pages and takes a page fault per 4 KiB of each large buffer. For a 28.7 MB
model's gradients that costs 20-30 ms a step on the 2-core test box, the
same order as the bfloat16 all-reduce saves on a 1 Gbit/s link
(``benchmarks/RESULTS.md``). Telling glibc to serve blocks up to 32 MiB from
the heap and to keep what is freed makes later steps reuse warm pages.

The cost is what Metal's cache costs too: the process keeps its peak
resident memory instead of shrinking between steps. ``--no-keep-freed-memory``
turns it off. Other C libraries (musl) and other systems are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

# glibc <malloc.h> parameter numbers for mallopt(3).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# What the settings are: blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the
# heap; up to 2 GB of free heap top is kept; the heap grows 256 MiB at a time.
SETTINGS = ((M_MMAP_THRESHOLD, 32 * 1024 * 1024), (M_TRIM_THRESHOLD, 2_000_000_000), (M_TOP_PAD, 256 * 1024 * 1024))
# glibc's own starting values: what ``stop_keeping_freed_memory`` puts back.
DEFAULTS = ((M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024), (M_TOP_PAD, 0))
# How far a process keeping freed memory may sit above MLX's peak: the heap's 256 MiB top pad plus a block
# below the mmap threshold. Measured: ZeRO-1 on the 118 MB MLP at 4 ranks, 777-878 MiB resident for an MLX
# peak of 611-627 MiB kept, 592-603 MiB not kept (benchmarks/RESULTS.md).
KEPT_FREED_BYTES = (256 + 32) * 1024 * 1024


def _glibc() -> Optional[ctypes.CDLL]:
    """The running process's C library if it is glibc (``mallopt`` means what SETTINGS assume), else None."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # glibc only: ValueError / OSError elsewhere
    except (ValueError, OSError, AttributeError):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(libc: Optional[object] = None) -> str:
    """Apply SETTINGS where they help; returns what was done, in words, for the rank's log.

    ``libc`` is for tests (an object with ``mallopt``); by default the process's own glibc.
    """
    if sys.platform == "darwin":
        return "macOS: MLX's Metal buffer cache keeps freed memory already"
    if not sys.platform.startswith("linux"):
        return f"{sys.platform}: left to the system allocator"
    lib = libc if libc is not None else _glibc()
    if lib is None:
        return "not glibc: left to the system allocator"
    failed = [param for param, value in SETTINGS if lib.mallopt(param, value) != 1]
    if failed:
        return f"glibc refused mallopt parameters {failed}"
    return "glibc keeps freed blocks up to 32 MiB for reuse"


def stop_keeping_freed_memory(libc: Optional[object] = None) -> str:
    """Undo ``keep_freed_memory`` (glibc's starting values, then the free heap handed back once); what was
    done, in words. For a rank whose memory budget leaves less room than a kept heap can take
    (``KEPT_FREED_BYTES``): a few page faults a step cost less than the kernel's OOM killer."""
    if not sys.platform.startswith("linux"):
        return "nothing to undo here"
    lib = libc if libc is not None else _glibc()
    if lib is None:
        return "nothing to undo here"
    for param, value in DEFAULTS:
        lib.mallopt(param, value)
    return_freed_memory(lib)
    return "freed memory goes back to the system"


def return_freed_memory(libc: Optional[object] = None) -> bool:
    """Hand the free heap back to the kernel once (glibc ``malloc_trim(0)``); True if anything went back.

    Why: the memory plan (``train_step._make_memory_plan``) reads the process's
    resident memory *besides* MLX's own buffers after its probe steps. With
    freed blocks kept, that reading would include the probes' freed buffers,
    which training reuses rather than adds to, and the plan would over-predict
    the peak by their size (56 MiB of 219 on the memory test's model). A no-op
    where the allocator was left alone.
    """
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        libc = _glibc()
        if libc is None or not hasattr(libc, "malloc_trim"):
            return False
    return bool(libc.malloc_trim(0))
