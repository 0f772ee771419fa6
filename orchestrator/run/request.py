"""What the user asked for: ``RunRequest`` (the CLI's one product) and the checks of its values.

The request ends in ``run/resolve.py``, which turns it into an immutable ``Job``; nothing
after that reads it again except through the job.
"""

from __future__ import annotations

import glob
import math
import os
import shlex
import stat
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from orchestrator.hostfile import ConfigError
from orchestrator.schema import Model


class RunRequest(Model):
    script: str  # the program: a file path (script), a module name (module), or an executable (command)
    program: Literal["script", "module", "command"] = "script"
    script_args: list[str] = Field(default_factory=list)
    hosts: Optional[str] = None  # --hosts mac1,mac2 instead of a hostfile
    include: Optional[str] = None
    exclude: Optional[str] = None
    n: Optional[int] = None
    hostfile: Optional[str] = None
    backend: Optional[str] = None
    fallback_backend: Optional[str] = None
    env: list[str] = Field(default_factory=list)
    cwd: Optional[str] = None
    python: Optional[str] = None
    run_dir: Optional[str] = None
    init_timeout: float = 60.0
    grace: float = 1.0
    hang_timeout: float = 300.0
    hang_floor: float = 30.0
    first_step_timeout: float = 120.0
    max_restarts: int = 0
    exclude_failed_host: bool = False
    restart_backoff: float = 1.0
    connections_per_ip: int = 1
    starting_port: Optional[int] = None
    ring_order: Literal["hostfile", "measured"] = "hostfile"  # measured: the fastest ring over the hosts' links
    echo: bool = True
    bind: bool = False
    stdin: Literal["none", "rank0", "all"] = "none"  # which ranks read orch's stdin (the others: /dev/null)
    resume_from: Optional[str] = None  # --resume-from GLOB: what a restarted attempt resumes from (newest match)
    resume_arg: Optional[str] = None  # --resume-arg TEMPLATE: the words that hand it to the program, with {latest}
    resume: bool = False  # --resume: the first attempt continues the run in --run-dir as a restart would
    json_output: bool = False
    # A run inside another command (``orch check --collective``): nothing of it on the terminal, where that
    # command reports the result itself. No CLI option sets it.
    silent: bool = False
    # SSH (remote hosts)
    ssh_config: Optional[str] = None
    known_hosts: Optional[str] = None
    identity: list[str] = Field(default_factory=list)
    ssh_accept_new: bool = False
    connect_timeout: float = 10.0
    keepalive_s: float = 1.0
    stage: list[str] = Field(default_factory=list)
    stage_to: list[str] = Field(default_factory=list)  # --stage-to SRC:DEST: orch stage before the ranks start
    # MPI
    mpirun: Optional[str] = None
    mpi_args: list[str] = Field(default_factory=list)


def check_values(req: RunRequest) -> None:
    """Numbers on the command line that would otherwise fail late, hang, or be silently ignored."""
    if req.starting_port is not None and not 1 <= req.starting_port <= 65535:
        raise ConfigError(f"--starting-port {req.starting_port}: not a TCP port; give one in 1-65535 (or leave it out)")
    positive = {"--init-timeout": req.init_timeout, "--hang-timeout": req.hang_timeout,
                "--hang-floor": req.hang_floor, "--first-step-timeout": req.first_step_timeout, "--grace": req.grace,
                "--connect-timeout": req.connect_timeout}
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value:g}: must be a positive, finite number of seconds")
    if not (math.isfinite(req.restart_backoff) and req.restart_backoff >= 0):
        raise ConfigError(f"--restart-backoff {req.restart_backoff:g}: must be 0 or a positive number of seconds")
    if req.max_restarts < 0:
        raise ConfigError(f"--max-restarts {req.max_restarts}: must be 0 or more")
    if req.run_dir is not None and not req.run_dir.strip():
        raise ConfigError("--run-dir '': an empty path; give a directory (or leave --run-dir out for runs/<time>-<script>)")
    if req.n is not None and req.n < 1:
        raise ConfigError(f"-n {req.n}: the number of ranks must be at least 1")
    if req.resume and not (req.run_dir and Path(req.run_dir).is_dir()):
        raise ConfigError(f"--resume: {'no run directory at ' + req.run_dir if req.run_dir else 'no --run-dir'}; give "
                          "--run-dir DIR, the run directory of the run to continue")
    resume_words(req)
    for pair in req.stage_to:
        stage_pair(pair)


def stage_pair(pair: str) -> tuple[str, str]:
    """``--stage-to SRC:DEST`` -> (SRC, DEST), checked as ``orch stage`` checks them (one line, exit 2)."""
    from orchestrator.stage.command import StageUsageError, check_dest

    src, sep, dest = pair.rpartition(":")
    if not sep or not src or not dest:
        raise ConfigError(f"--stage-to {pair!r}: give SRC:DEST, e.g. --stage-to ./my-model:~/models/my-model")
    if not os.path.exists(os.path.expanduser(src)):
        raise ConfigError(f"--stage-to {pair!r}: {src}: no such file or folder")
    try:
        return src, check_dest(dest)
    except StageUsageError as e:
        raise ConfigError(f"--stage-to {pair!r}: {e}") from None


def resume_words(req: RunRequest) -> list[str]:
    """--resume-arg's words (``{latest}`` still in them), after checking the pair of options makes sense."""
    if req.resume_arg is None and req.resume_from is None:
        return []
    if req.resume_arg is None:
        raise ConfigError("--resume-from: add --resume-arg TEMPLATE, the words that hand the file to the program "
                          "(e.g. --resume-arg '--resume-adapter-file {latest}')")
    if req.resume_from is None or not req.resume_from.strip():
        raise ConfigError("--resume-arg: add --resume-from GLOB, the files to resume from, relative to the run directory "
                          "(e.g. --resume-from 'adapters/*_adapters.safetensors')")
    try:
        words = shlex.split(req.resume_arg)
    except ValueError as e:
        raise ConfigError(f"--resume-arg {req.resume_arg!r}: {e}; quote the template as one argument") from None
    if not any("{latest}" in w for w in words):
        raise ConfigError(f"--resume-arg {req.resume_arg!r}: no {{latest}} in it; write where the file goes, "
                          "e.g. '--resume-adapter-file {latest}'")
    if req.max_restarts < 1 and not req.resume:
        raise ConfigError("--resume-arg: it is used when a failed attempt is restarted; add --max-restarts 1 (or more)")
    return words


def newest_match(pattern: str, base: Path) -> Optional[str]:
    """The newest regular file matching ``pattern`` (relative to ``base`` unless absolute; ``**`` recurses).

    Newest by modification time, then by name (zero-padded step numbers sort
    right when two files share a timestamp). An absolute path, so a rank with
    another working directory finds it.
    """
    full = os.path.expanduser(pattern)
    if not os.path.isabs(full):
        full = str(base / full)
    best: Optional[tuple[tuple[int, str], str]] = None
    for name in glob.glob(full, recursive=True):
        try:
            st = os.stat(name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (best is None or (st.st_mtime_ns, name) > best[0]):
            best = ((st.st_mtime_ns, name), name)
    return os.path.abspath(best[1]) if best else None
