"""Helpers for tests that run the real `orch` command: bounded, and they clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "scripts"
RECIPES = ROOT / "recipes"


def orch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def start_orch(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(orch_argv(*args), cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a started command (bounded); on timeout kill its whole tree and fail with its output."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"{' '.join(map(str, p.args[1:4]))} did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_orch(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return finish(start_orch(*args, cwd=cwd, env=env), timeout)


def kill_tree(pid: int) -> None:
    """Kill a process we started and everything below it (by PID, never by name)."""
    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def rank_pids(run_dir: Path) -> list[int]:
    return [r["pid"] for r in summary(run_dir)["ranks"] if r["pid"]]


def alive(pids, timeout: float = 0.0) -> list[int]:
    """The pids still running (zombies count as gone) after waiting up to timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def end_stopped(pids) -> None:
    """Cleanup for tests that SIGSTOP ranks they started: resume and kill those still alive (by PID)."""
    for pid in alive(pids):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def wait_for_line(proc: subprocess.Popen, needle: str, count: int = 1, timeout: float = 60) -> list[str]:
    """Read proc.stdout until `needle` has appeared `count` times (bounded).

    Reads the raw descriptor with os.read into our own buffer: a buffered
    readline() after select() can pull several lines into Python's buffer, and
    the next select() would then wait for bytes that already arrived.
    """
    import os
    import selectors

    seen: list[str] = []
    pending = b""
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while sum(needle in l for l in seen) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} x{count} not seen in {timeout}s; got {seen}")
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    raise AssertionError(f"orch exited {proc.returncode} before {needle!r}; got {seen}")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if pending:
                    seen.append(pending.decode(errors="replace"))
                if sum(needle in l for l in seen) >= count:
                    break
                raise AssertionError(f"orch closed stdout before {needle!r}; got {seen}")
            pending += chunk
            *lines, pending = pending.split(b"\n")
            seen.extend(l.decode(errors="replace") + "\n" for l in lines)
    finally:
        sel.close()
    return seen


def events(run_dir: Path) -> list[dict]:
    """The run's events (events.jsonl), in order; [] before the file exists.

    The controller may be writing while a test reads: a last line without its
    newline that does not parse yet is the next event half-written, and is left
    for the next read. Any other line that does not parse fails the test.
    """
    try:
        # Bytes first: a half-written tail may end inside a character.
        text = (Path(run_dir) / "events.jsonl").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines):
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:  # no newline after it: still being written
                break
            raise AssertionError(f"{run_dir}/events.jsonl line {n + 1} is not JSON: {line!r}")
    return out


def orch_check(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``orch check ARGS`` on this machine, from the repository root, bounded (its process tree killed on timeout)."""
    return finish(subprocess.Popen(orch_argv("check", *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True), timeout)


def ring_hostfile(cluster, path: Path) -> Path:
    """mlx.launch's format for namespace hosts: both ring addresses of each with their /30 (orch picks the left
    one), and this interpreter as every host's python."""
    hosts = [{"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"], "python": sys.executable}
             for h in cluster.hosts]
    path.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    return path
