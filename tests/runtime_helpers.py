"""Run recipes as real rank processes for the runtime tests: bounded, and they clean up.

``launch(script, n, run_dir, args)`` starts ``n`` ranks of ``python script
args`` on this machine the way the launcher does for the ring backend: a free
port per rank on 127.0.0.1, the ring hostfile JSON ``[["127.0.0.1:P0"],
["127.0.0.1:P1"]]``, and per rank ``MLX_RANK`` + ``MLX_HOSTFILE`` (not set at
all for ``n == 1``, which must give a singleton group) and ``ORCH_RUN_DIR``.
It does not go through ``orch run`` so that the runtime is tested on its own;
only :func:`launch` would change to use ``orch run SCRIPT -n N --run-dir DIR
-- ARGS`` instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from orchestrator import protocol

Args = Union[list[str], Callable[[int], list[str]]]  # the same for every rank, or per rank

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"

# Variables a launcher sets; never inherit them from whoever runs the tests.
_LAUNCHER_ENV_PREFIXES = ("MLX_", "OMPI_", "PMI_", "PMIX_", "ORCH_")


@dataclass
class RankOutput:
    rank: int
    returncode: Optional[int]
    stdout: str
    stderr: str
    events: list[dict] = field(default_factory=list)
    text: str = ""  # stdout without the event lines

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind]


def parse_output(rank: int, returncode: Optional[int], stdout: str, stderr: str) -> RankOutput:
    events, text = [], []
    # Not str.splitlines(): it also splits at "\x1e", the first character of protocol.MARKER.
    for line in stdout.split("\n"):
        user, event = protocol.split_line(line)
        if user:
            text.append(user)
        if event:
            events.append(event)
    return RankOutput(rank, returncode, stdout, stderr, events, "\n".join(text))


def free_ports(n: int) -> list[int]:
    """Ports the OS says are free now (all bound at once so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rank_env(rank: int, run_dir: Path, hostfile: Optional[Path], extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}
    env.update({"ORCH_RUN_DIR": str(run_dir), "ORCH_EVENTS": "1", "PYTHONUNBUFFERED": "1"})
    if hostfile is not None:
        env.update({"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)})
    env.update(extra or {})
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a rank's whole process group (each rank runs in its own session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def start(script: Path, n: int, run_dir: Path, args: Args, extra_env: Optional[dict] = None
          ) -> tuple[list[subprocess.Popen], list[tuple[Path, Path]]]:
    """Start ``n`` ranks; their output goes to files in ``run_dir/test-logs`` (no pipe can fill up)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "test-logs"
    logs.mkdir(exist_ok=True)
    hostfile = None
    if n > 1:
        hostfile = run_dir / "ring-hostfile.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs, files = [], []
    try:
        for rank in range(n):
            out, err = logs / f"rank-{rank}.out", logs / f"rank-{rank}.err"
            argv = [sys.executable, str(script), *(args(rank) if callable(args) else args)]
            with open(out, "wb") as fo, open(err, "wb") as fe:
                procs.append(subprocess.Popen(
                    argv, cwd=run_dir, env=rank_env(rank, run_dir, hostfile, extra_env),
                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True,
                ))
            files.append((out, err))
    except BaseException:
        for p in procs:
            kill_group(p)
        raise
    return procs, files


def collect(procs: list[subprocess.Popen], files: list[tuple[Path, Path]]) -> list[RankOutput]:
    return [parse_output(r, p.poll(), out.read_text(errors="replace"), err.read_text(errors="replace"))
            for r, (p, (out, err)) in enumerate(zip(procs, files, strict=True))]


def launch(script: Path, n: int, run_dir: Path, args: Args, timeout: float = 60,
           extra_env: Optional[dict] = None, check: bool = True) -> list[RankOutput]:
    """Run ``n`` ranks to completion within ``timeout`` seconds; kill them all otherwise.

    With ``check`` (default) any non-zero exit or a timeout fails with every rank's output.
    """
    procs, files = start(script, n, run_dir, args, extra_env)
    timed_out = False
    try:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if check and any(p.poll() not in (None, 0) for p in procs):
                break  # one rank failed: the others would hang in a collective
            time.sleep(0.05)
    finally:
        for p in procs:
            kill_group(p)
    results = collect(procs, files)
    if check and (timed_out or any(r.returncode != 0 for r in results)):
        why = f"timed out after {timeout} s" if timed_out else "a rank failed"
        detail = "\n".join(f"--- rank {r.rank} rc={r.returncode}\n{r.text[-3000:]}\n{r.stderr[-3000:]}"
                           for r in results)
        shown = args(0) if callable(args) else args
        raise AssertionError(f"{script.name} x{n} {' '.join(shown)}: {why}\n{detail}")
    return results


# ----------------------------------------------------------------------------- reading results


def latest_checkpoint(run_dir: Path) -> Path:
    manifest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return run_dir / "checkpoints" / manifest["path"]


def load_arrays(checkpoint: Path) -> dict[str, np.ndarray]:
    """Model and optimizer arrays of a checkpoint as numpy, keys prefixed ``model.`` / ``optimizer.``."""
    import mlx.core as mx

    arrays = {}
    for prefix, name in (("model", "model.safetensors"), ("optimizer", "optimizer.safetensors")):
        for key, value in mx.load(str(checkpoint / name)).items():
            arrays[f"{prefix}.{key}"] = np.array(value)
    return arrays


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], prefix: str = "model.") -> float:
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix)), "different parameter sets"
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in keys)
