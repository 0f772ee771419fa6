"""One run's staging on one host: its paths, the shared runtime, every site's code and inputs.

The launcher's pipeline per host (``launch/ssh.py``): connect (``ssh.py``), ``open_host``,
then ``stage_host`` while the ranks' login shells start. What is kept on a host and how it is
checked is ``stager.py``'s; the local trees are ``manifest.py``'s; the run directories
(``BASE/runs/<run-id>-h<i>/{code,run}``: run ids, one per hostfile entry, retired to
``runs/.trash-*`` after collection and deleted by a later run) are ``sites.py``'s.

One helper command per host does the checking and placing (``stage_host``), and it runs in
that host's first rank session (``SessionHelper``) before the session waits for its release:
every session pays for a login shell and its rc files.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from orchestrator.remote.stager import HelperUnavailable, RemoteStager
from orchestrator.remote.manifest import Tree

if TYPE_CHECKING:
    from orchestrator.remote.sites import HostLink, Site


class SessionHelper:
    """The helper in a session opened for something else: a host's first rank session
    (launch/ssh.py's ``rank_command(helper_python=...)``) runs it before it waits for its release.

    ``run`` is the stager's ``first_helper``: the framed request on the session's stdin, the helper's
    result line from its stdout (nothing else is written there before the release). ``failed``: the
    session cannot be released (the helper did not answer); the launcher opens a plain one instead.
    """

    def __init__(self, proc):
        self.proc = proc
        self.failed = False

    async def run(self, framed: bytes, timeout: float) -> str:
        from orchestrator.remote.ssh import asyncssh

        try:
            self.proc.stdin.write(framed)
            return await asyncio.wait_for(self._result(), timeout)
        except asyncio.TimeoutError:
            self.failed = True
            raise
        except (asyncssh.Error, OSError, HelperUnavailable) as e:
            self.failed = True
            raise HelperUnavailable(f"the first rank session could not run the check: {e}") from None

    async def _result(self) -> str:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise HelperUnavailable("its session ended")
            text = line.decode(errors="replace").strip()
            if text.startswith("{") and '"missing"' in text:  # the helper's one result line; rc-file noise is skipped
                return text


@dataclass
class SiteInputs:
    """What one site gets besides the code: the per-job files its ranks' environment names
    (``{remote name: local path}``, e.g. MLX_IBV_DEVICES), and on a restart the latest local
    checkpoint (rank 0's site) and the --resume-arg file (every site)."""

    files: dict[str, str] = field(default_factory=dict)
    checkpoint: Optional[tuple[Path, Path]] = None  # (directory, latest.json): sites.latest_checkpoint
    resume_file: Optional[str] = None


async def open_host(link: "HostLink", runtime_tree: Tree, sites: Sequence["Site"], run_id: str,
                    python: str = "python3") -> None:
    """The host's SFTP session and every remote path of this run there (nothing is created yet).

    ``python``: the interpreter the host's ranks use, which also runs the staging helper. Not
    ``python3`` from the login PATH when the ranks have their own: a pyenv shim alone costs
    ~0.1 s per call (a bash script that execs ``pyenv exec``).
    """
    from orchestrator.remote import sites as layout

    link.sftp = await link.ssh.conn.start_sftp_client()
    link.home = await link.sftp.realpath(".")
    link.stager = RemoteStager(link.sftp, link.base, link.stats, python=python)
    link.runtime_dir = link.stager.shared_tree_path(runtime_tree, "runtime")
    for site in sites:
        layout.place(site, run_id)


async def stage_host(link: "HostLink", sites: Sequence["Site"], runtime_tree: Tree, code_tree: Optional[Tree],
                     inputs: dict[int, SiteInputs]) -> None:
    """Everything this run needs on one host: the shared runtime, and per site its directories, code and inputs.

    One helper command for all of it (the runtime checked or built, every site's directories made and
    code placed): each remote command pays for a session, the login shell's rc files and a Python
    start. Then the per-site inputs over SFTP, all at once.
    """
    import time

    t0 = time.monotonic()
    runs = [(code_tree, s.code_dir, "code") for s in sites if s.code_dir and code_tree is not None]
    dirs = [d for s in sites for d in (s.run_dir, s.code_dir) if d]
    await link.stager.stage(shared=[(runtime_tree, "runtime")], runs=runs, dirs=dirs)

    async def site_inputs(site: "Site") -> None:
        got = inputs.get(site.index) or SiteInputs()
        await asyncio.gather(_put_files(link, site, got.files),
                             *([_put_checkpoint(link, site, *got.checkpoint)] if got.checkpoint is not None else []),
                             *([_put_resume_file(link, site, got.resume_file)] if got.resume_file else []))

    await asyncio.gather(*(site_inputs(s) for s in sites))
    link.stats.seconds = round(time.monotonic() - t0, 4)


async def _put(link: "HostLink", local: str, remote: str) -> None:
    await link.sftp.put(local, remote)
    link.stats.uploaded_files += 1
    link.stats.uploaded_bytes += os.path.getsize(local)


async def _put_files(link: "HostLink", site: "Site", files: dict[str, str]) -> None:
    """Per-job inputs into the site's run root, beside ``run/``: collection never brings them back,
    and retiring the run root removes them with the rest."""
    for name, local in sorted(files.items()):
        await _put(link, local, f"{site.run_root}/{name}")


async def _put_checkpoint(link: "HostLink", site: "Site", src: Path, manifest: Path) -> None:
    """A restarted attempt resumes from the checkpoint the last one brought home; rank 0 shares it at start."""
    dst = f"{site.run_dir}/checkpoints"
    await link.sftp.mkdir(dst)
    await link.sftp.put(str(src), f"{dst}/{src.name}", recurse=True)
    await link.sftp.put(str(manifest), f"{dst}/latest.json")
    link.stats.uploaded_files += sum(1 for p in src.iterdir() if p.is_file()) + 1


async def _put_resume_file(link: "HostLink", site: "Site", local: str) -> None:
    """Every site gets the file the restarted attempt resumes from (every rank may load it, as mlx-lm loads
    an adapter file), beside ``run/`` so collection does not bring it back."""
    from orchestrator.remote.sites import resume_path

    remote = resume_path(site, local)
    await link.sftp.mkdir(remote.rpartition("/")[0])
    await _put(link, local, remote)
