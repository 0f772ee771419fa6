"""The remote command lines of a rank on an SSH host, and what comes back as SSH's words: pure functions.

``launch/ssh.py`` opens the sessions and runs them; this module only builds what the remote login shell
executes (``rank_command``), what a waiting session is sent (``release_lines``, ``config_line``) and how an
SSH exit signal reads here (``exit_signal_status``). Every piece of a command line is ``shlex.quote``'d.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from pathlib import Path
from typing import Optional

from orchestrator import protocol
from orchestrator.launch.base import TOKEN_LINE_FLAG, ExitStatus, LaunchError, RankSpec, token_line
from orchestrator.plan import FILE_NAMES, file_name
from orchestrator.remote import sites as layout, stager
from orchestrator.remote.sites import Site

DEFAULT_PYTHON = "python3"
RELEASE = b"start\n"  # the line a pre-opened session waits for before it execs the guard
DEFERRED_FLAG = "--deferred"  # the guard starts its rank at once and waits for its configuration line
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")



def staged_files(spec: RankSpec) -> dict[str, str]:
    """``{env var: local path}``: the per-job files (``plan.write_files``, e.g. ``MLX_IBV_DEVICES``) this rank's
    environment names, which must exist on its host. ``prepare`` copies each into the host's remote run
    directory under the same name and ``remote_env`` points the variable there. ``MLX_HOSTFILE`` is not
    among them: its content travels in ``ORCH_MLX_HOSTFILE_JSON`` and the bootstrap writes it."""
    return {var: spec.env[var] for var in FILE_NAMES if var != "MLX_HOSTFILE" and spec.env.get(var)}


def remote_env(spec: RankSpec, *, run_dir: str, pythonpath: str, files_dir: Optional[str] = None) -> dict[str, str]:
    """Exactly what the rank gets on top of the remote login environment: ``spec.env``, adapted to the host.

    ``files_dir``: where ``prepare`` staged the ``staged_files`` on that host (default ``run_dir``).
    """
    env = dict(spec.env)
    env.pop("MLX_HOSTFILE", None)  # a local path; the bootstrap writes the remote copy
    if spec.mlx_hostfile_json is not None:
        env[protocol.ENV_MLX_HOSTFILE_JSON] = spec.mlx_hostfile_json
    for var in staged_files(spec):  # a local path too: the staged copy on that host instead
        env[var] = f"{(files_dir or run_dir).rstrip('/')}/{file_name(var)}"
    env[protocol.ENV_RUN_DIR] = run_dir
    env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def build_command(argv: list[str], env: dict[str, str], cwd: str) -> str:
    """The remote shell line: ``cd CWD && exec env K=V ... ARGV``, every piece ``shlex.quote``'d."""
    for key in env:
        if not _ENV_KEY.match(key):
            raise LaunchError(f"environment variable name {key!r} cannot be passed to a remote host")
    parts = ["cd", shlex.quote(cwd), "&&", "exec", "env"]
    parts += [shlex.quote(f"{k}={v}") for k, v in env.items()]
    parts += [shlex.quote(a) for a in argv]
    return " ".join(parts)


def prestarts(spec: RankSpec) -> bool:
    """Whether ``prepare`` may start this rank's Python (and its MLX import) before the launch is released.

    Not for ``--stdin`` ranks (a deferred guard gives its rank /dev/null), nor with ``ORCH_PRESPAWN=0``."""
    return protocol.ENV_STDIN not in spec.env and os.environ.get(protocol.ENV_PRESPAWN, "1") != "0"


def config_line(spec: RankSpec, site: Site, token: str) -> bytes:
    """What a pre-started (``--deferred``) guard waits for: the program, its arguments and the token, as one
    JSON line (its environment and working directory were on the command line already)."""
    argv = spec.program_argv(_script_and_cwd(spec, site)[1], layout.resume_path(site, spec.resume_file))
    return (json.dumps({"env": {}, "argv": argv, "cwd": None, protocol.TOKEN_FIELD: token}) + "\n").encode()


def _script_and_cwd(spec: RankSpec, site: Site) -> tuple[str, str]:
    if spec.cwd or not site.stage_code:
        return spec.cwd or site.link.home, spec.script
    return site.code_dir, f"{site.code_dir}/{Path(spec.script).name}"


def rank_command(spec: RankSpec, site: Site, *, helper_python: Optional[str] = None, deferred: bool = False) -> str:
    """``read -r orch_go && cd DIR && exec env ... guard -- bootstrap SCRIPT ARGS``: waits for one release line.

    A script runs from the site's staged copy of its directory (unless --cwd, or the site stages no code);
    its environment points at the site's run directory and staged runtime.

    ``helper_python``: the host's first rank session runs the staging helper first (``stager.helper_command``,
    fed a framed request on the same stdin): every session pays for the login shell and its rc files
    (``pyenv init`` in .bashrc: ~0.3 s of CPU), so the host pays for one shell instead of two. The release line
    must then read ``start``: if the helper never ran, what it did not read must not release the rank.

    ``deferred``: the released shell starts a ``--deferred`` guard whose rank imports MLX at once and waits
    for ``config_line`` (program, arguments, token) before any of the user's code runs; ``prepare`` releases
    these shells as soon as their host is staged, so the ranks' start-up overlaps the other hosts' staging.
    """
    python = spec.python or DEFAULT_PYTHON
    cwd, script = _script_and_cwd(spec, site)
    env = remote_env(spec, run_dir=site.run_dir, pythonpath=site.link.runtime_dir, files_dir=site.run_root)
    if deferred:
        argv = [python, "-S", "-m", "orchestrator.runtime.guard", DEFERRED_FLAG, "--",
                python, "-m", "orchestrator.runtime.bootstrap"]
    else:
        argv = spec.rank_argv(python, script, guard_flags=(TOKEN_LINE_FLAG,),
                              resume_path=layout.resume_path(site, spec.resume_file))
    if helper_python:
        return (stager.helper_command(helper_python) + '; read -r orch_go && [ "$orch_go" = ' + RELEASE.decode().strip()
                + " ] && " + build_command(argv, env, cwd))
    return "read -r orch_go && " + build_command(argv, env, cwd)


UNKNOWN_SIGNAL = 99  # the number for a signal name this platform does not have (its words stay readable)
_RFC4254_SIGNALS = {"ABRT": 6, "ALRM": 14, "FPE": 8, "HUP": 1, "ILL": 4, "INT": 2, "KILL": 9, "PIPE": 13,
                    "QUIT": 3, "SEGV": 11, "TERM": 15, "USR1": 10, "USR2": 12}


def signal_number(name: str) -> int:
    """SSH exit-signal name ("KILL", "TERM", ...) to this platform's number; ``UNKNOWN_SIGNAL`` if it has none.

    OpenSSH names only the signals of RFC 4254 and reports every other one
    (SIGTRAP, SIGBUS, ...) as "SIG@openssh.com"; such a number must never be
    fed to ``signal.Signals`` (``base.signal_name`` words any number).
    """
    bare = str(name).upper().removeprefix("SIG")
    try:
        return int(signal.Signals["SIG" + bare])
    except KeyError:
        return _RFC4254_SIGNALS.get(bare, UNKNOWN_SIGNAL)


def exit_signal_status(name: str) -> ExitStatus:
    """The status of a session that ended by the signal SSH reports as ``name``."""
    number = signal_number(name)
    known = number != UNKNOWN_SIGNAL
    return ExitStatus(code=None, signal=number, signal_label=None if known else str(name))


def kill_group_command(pid: int) -> Optional[str]:
    """The remote line that SIGKILLs a rank's process group, or None for a pid that must never be signalled.

    ``pid`` comes only from the guard's authenticated ``spawned`` event. Even
    so, the group is killed only while it is still the guard's: its leader
    leads its own group and its parent runs ``orchestrator.runtime.guard``
    (``ps`` fields that both procps and BSD ps have). A pid of 0 or 1
    (``kill -KILL -1`` as root is every process on the host) is refused outright. No ``--``:
    dash, a common /bin/sh, rejects it.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        return None
    return (f"p={pid}; g=$(ps -o pgid= -p $p 2>/dev/null | tr -d ' '); [ \"$g\" = $p ] || exit 0; "
            f"pp=$(ps -o ppid= -p $p 2>/dev/null | tr -d ' '); [ -n \"$pp\" ] && [ \"$pp\" -gt 1 ] || exit 0; "
            f"ps -o args= -p $pp 2>/dev/null | grep -q orchestrator.runtime.guard && kill -KILL -$p 2>/dev/null; exit 0")


def release_lines(token: str) -> bytes:
    """What ``start`` writes to a waiting session: the shell's release line, then the guard's token line."""
    return RELEASE + (token_line(token) + "\n").encode()
