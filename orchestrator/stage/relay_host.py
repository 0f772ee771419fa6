"""One host of a stage as the controller holds it (``RelayHost``), what the stage was asked
(``StageRequest``), and how a relay is started there (``BOOT``, ``relay_command``)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator.hostfile import Hostfile
from orchestrator.stage import plan

BOOT = ('import json,sys;b=sys.stdin.buffer;d=json.loads(b.read(int(b.readline())));'
        'exec(d["src"],{"CFG":d["cfg"],"IN":b,"__name__":"orch_relay"})')


@dataclass
class StageRequest:
    src: str
    dest: str
    hostfile: Hostfile
    ssh: Any = None                     # remote.ssh.SSHOptions
    python: Optional[str] = None
    verify: bool = False
    pass_timeout_s: float = 30.0        # connects and accepts of one pass
    stall_s: float = 60.0               # a hop that delivers nothing for this long fails


@dataclass
class RelayHost:
    """One stop's relay and what the controller knows of it."""

    stop: plan.Stop
    conn: Any = None                    # remote.ssh.Connection, None on this machine
    proc: Any = None
    addr: str = "127.0.0.1"             # where the controller reached it
    port: int = 0
    have: set = field(default_factory=set)
    partial: dict = field(default_factory=dict)
    replaced: list = field(default_factory=list)
    resumed: int = 0
    skipped: int = 0
    damaged: dict = field(default_factory=dict)
    status: str = "ok"
    reason: Optional[str] = None
    rx: int = 0
    wr: int = 0
    files_written: int = 0
    dead: bool = False                  # its relay ended
    reader: Optional[asyncio.Task] = None
    stderr: str = ""
    first: asyncio.Queue = field(default_factory=asyncio.Queue)  # its reports until ``ready``
    lost_early: bool = False            # its relay ended before the stage did
    scanned: bool = False               # we know what it has (its relay's scan, or the SFTP check)
    checked: Optional[str] = None       # how: "sftp" (records unchanged), "relay" (records or hashes), "verify"
    cpu_s: Optional[float] = None       # the relay's CPU time (user + system), reported as it ends
    busy_s: float = 0.0                 # seconds it spent in passes (from a pass's start to its done)

    @property
    def name(self) -> str:
        return self.stop.name

    @property
    def alive(self) -> bool:
        return self.status == "ok" and not self.dead and (self.conn is None or not self.conn.lost)

    def send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        except Exception:  # noqa: BLE001 - the session went away; its reader notices
            pass

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.write_eof() if hasattr(self.proc.stdin, "write_eof") else self.proc.stdin.close()
        except Exception:  # noqa: BLE001
            pass


def relay_command(python: str) -> list[str]:
    return [python, "-S", "-c", BOOT]


def _words(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""
