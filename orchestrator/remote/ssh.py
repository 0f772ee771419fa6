"""One way to connect to a host over SSH, for every command that does.

``orch run`` (the SSH launcher), ``orch check``, ``orch env``, ``orch hostfile``
(``--apply``, ``--ring-order measured``) and ``--ring-order measured`` all take an
``SSHOptions`` built from their parsed arguments (``SSHOptions.from_args``) and
connect with ``connect`` / ``connect_hosts``: the same ssh_config, known_hosts,
identities, user/port, accept-new and keepalives, and the same words for why a
host could not be reached (``describe_connect_error``).

Host keys are always verified against known_hosts; ``accept_new`` is OpenSSH's
``StrictHostKeyChecking=accept-new``: unknown keys are trusted and recorded,
changed keys are refused. Keepalives (``keepalive_s`` x ``KEEPALIVE_COUNT_MAX``)
notice a host that vanished: ``Connection.lost``, with ``lost_reason``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import Field

from orchestrator.remote import DEFAULT_CONNECT_TIMEOUT
from orchestrator.schema import Model


def _quiet_known_warnings() -> None:
    """Keep asyncssh's known import-time warnings off the user's screen, narrowly.

    cryptography 51 deprecated DSA, and asyncssh 2.24 names ``dsa.*`` types in its
    module-level annotations: ``import asyncssh`` alone then prints five
    ``CryptographyDeprecationWarning``s (10 lines of stderr) before every ``orch check``,
    ``orch env`` and SSH ``orch run``, and before a one-line error. Only that category,
    and only when raised from asyncssh's own modules, is ignored; everything else (and
    the same warning from any other module) still shows. Older cryptography has no such
    category name: nothing to silence.
    """
    import warnings

    try:
        from cryptography.utils import CryptographyDeprecationWarning
    except ImportError:  # pragma: no cover - cryptography without the class: it warns about nothing
        return
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)")


def _import_asyncssh():
    """``import asyncssh``, without ctypes.util.find_library's slow fallbacks or its known warnings.

    At import asyncssh looks for liboqs (``find_library("oqs")``, then ``"liboqs"``). On Linux
    a library not in the ldconfig cache then costs a ``gcc`` and an ``ld`` run: ~40-70 ms of
    every ``orch run`` over SSH. During that import only, the ldconfig cache answers (an
    installed liboqs is in it); elsewhere, and on other systems, nothing changes.
    """
    import ctypes.util

    _quiet_known_warnings()
    find = ctypes.util.find_library
    ldconfig = getattr(ctypes.util, "_findSoname_ldconfig", None)
    if not sys.platform.startswith("linux") or ldconfig is None:
        import asyncssh
        return asyncssh

    def cached_only(name):
        try:
            return ldconfig(name)
        except Exception:  # noqa: BLE001 - whatever goes wrong here, the full search decides
            return find(name)

    ctypes.util.find_library = cached_only
    try:
        import asyncssh
    finally:
        ctypes.util.find_library = find
    return asyncssh


asyncssh = _import_asyncssh()

KEEPALIVE_COUNT_MAX = 3


class SSHOptions(Model):
    """How to reach hosts: what the SSH options of every command line say."""

    model_config = {"frozen": True}

    ssh_config: Optional[str] = None      # an OpenSSH client config (default: asyncssh's ~/.ssh/config)
    known_hosts: Optional[str] = None     # default ~/.ssh/known_hosts
    identity: list[str] = Field(default_factory=list)  # private key files
    accept_new: bool = False              # trust (and record) unknown host keys; changed ones stay refused
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    keepalive_s: float = 1.0              # a host that answers none of 3 keepalives is lost

    @classmethod
    def from_args(cls, args: Any, **override: Any) -> "SSHOptions":
        """From parsed arguments (``add_ssh_arguments``' names) or anything with the same attributes;
        ``override`` for what a command words differently (``orch check``: ``--timeout``)."""
        values = dict(
            ssh_config=getattr(args, "ssh_config", None),
            known_hosts=getattr(args, "known_hosts", None),
            identity=list(getattr(args, "identity", None) or []),
            accept_new=bool(getattr(args, "ssh_accept_new", False)),
            connect_timeout=getattr(args, "connect_timeout", None) or DEFAULT_CONNECT_TIMEOUT,
            keepalive_s=getattr(args, "keepalive_s", None) or 1.0,
        )
        values.update(override)
        return cls(**values)

    @property
    def known_hosts_path(self) -> str:
        return os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")

    def asyncssh_options(self, user: Optional[str], port: Optional[int]) -> dict:
        opts: dict[str, Any] = dict(keepalive_interval=self.keepalive_s, keepalive_count_max=KEEPALIVE_COUNT_MAX)
        if self.ssh_config:
            opts["config"] = [os.path.expanduser(self.ssh_config)]
        if self.known_hosts:
            opts["known_hosts"] = os.path.expanduser(self.known_hosts)
        if self.identity:
            opts["client_keys"] = [os.path.expanduser(p) for p in self.identity]
        if user:
            opts["username"] = user
        if port:
            opts["port"] = port
        return opts


# ----------------------------------------------------------------------------- words


def _address_in(text: str) -> Optional[str]:
    m = re.search(r"\('([^']+)', (\d+)\)", text)
    return f"{m.group(1)}:{m.group(2)}" if m else None


def describe_connect_error(exc: BaseException, *, timeout: float, known_hosts: Optional[str] = None,
                           key_problem: Optional[str] = None, user: Optional[str] = None) -> str:
    """Why a host could not be reached, in words a person can act on (no traceback, no class names if avoidable)."""
    kh = known_hosts or "~/.ssh/known_hosts"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {timeout:g}s (host down, wrong address, or a firewall dropping SSH; see --connect-timeout)"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host name (not in DNS or /etc/hosts, and no HostName for it in the SSH config)"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        if key_problem == "changed":
            return (f"host key CHANGED: the key it presented is not the one recorded in {kh} (possible "
                    "man-in-the-middle; if the host was reinstalled, remove the old entry with ssh-keygen -R)")
        if key_problem == "revoked" or "revoked" in str(exc).lower():
            return f"host key is marked @revoked in {kh}"
        return (f"host key not verifiable: the host is not in {kh}; check its fingerprint and add it "
                "(ssh-keyscan), or pass --ssh-accept-new to trust it on first use")
    if isinstance(exc, asyncssh.PermissionDenied):
        who = f" as {user}" if user else ""
        return f"authentication failed{who}: the server accepted none of the keys offered (give one with -i, or IdentityFile in the SSH config)"
    if isinstance(exc, ConnectionRefusedError):
        where = _address_in(str(exc))
        return f"connection refused{' at ' + where if where else ''} (is sshd running there, on that port?)"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to the host (network unreachable from here)"
    if isinstance(exc, OSError) and "Multiple exceptions" in str(exc):
        if "Connect call failed" in str(exc) and "refused" in str(exc).lower():
            return "connection refused on every address (is sshd running there?)"
    if isinstance(exc, (ConnectionResetError, asyncssh.ConnectionLost, BrokenPipeError)):
        return "the host closed the connection during the SSH handshake"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"SSH handshake failed: {exc.reason}"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file (a known_hosts, config or key file)"
    if isinstance(exc, asyncssh.KeyImportError):
        return f"cannot load a private key: {exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"


def describe_lost(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "the host closed it"
    text = str(exc)
    if "keepalive" in text.lower():
        return "no answer to keepalives"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "connection reset"
    return text or type(exc).__name__


# ----------------------------------------------------------------------------- one connection


@dataclass
class Connection:
    """One host's connection as ``connect`` made it, or why it could not be made (``error``)."""

    name: str
    user: Optional[str] = None
    port: Optional[int] = None
    conn: Optional[asyncssh.SSHClientConnection] = None
    error: Optional[str] = None        # describe_connect_error's words; None when connected
    key_status: Optional[str] = None   # "known", "accepted-new"; refused: "unknown", "changed"
    connect_s: Optional[float] = None
    lost_exc: Optional[BaseException] = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set when it went away after it was made
    closing: bool = False
    new_key: Optional[tuple] = None    # accept-new: (host, addr, port, key) to record

    @property
    def ok(self) -> bool:
        return self.conn is not None and self.error is None

    @property
    def alive(self) -> bool:
        return self.conn is not None and not self.gone.is_set()

    @property
    def lost(self) -> bool:
        """The connection went away after it was made (host vanished, keepalives unanswered)."""
        return self.gone.is_set()

    @property
    def lost_reason(self) -> str:
        return f"lost the SSH connection to {self.name} ({describe_lost(self.lost_exc)})"

    def close(self) -> None:
        self.closing = True
        if self.conn is not None:
            self.conn.close()

    async def wait_closed(self, timeout: float = 3.0) -> None:
        if self.conn is not None:
            try:
                await asyncio.wait_for(self.conn.wait_closed(), timeout)
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                pass


class _Client(asyncssh.SSHClient):
    def __init__(self, c: Connection, accept_new: bool):
        self._c = c
        self._accept_new = accept_new
        self._conn = None

    def connection_made(self, conn) -> None:
        self._conn = conn

    def connection_lost(self, exc: Optional[Exception]) -> None:
        c = self._c
        if c.conn is not None and not c.closing and not c.gone.is_set():
            c.lost_exc = exc
            c.gone.set()

    def validate_host_public_key(self, host: str, addr: str, port: int, key) -> bool:
        # Called only when the key is not among those known_hosts trusts for this host.
        trusted = getattr(self._conn, "_trusted_host_keys", None)
        if trusted:  # the host is known, with another key
            self._c.key_status = "changed"
            return False
        self._c.key_status = "unknown"
        if self._accept_new:
            self._c.new_key = (host, addr, port, key)
            return True
        return False


def _record_host_key(opts: SSHOptions, host: str, addr: str, port: int, key, err) -> None:
    """accept-new: append the key to known_hosts the way OpenSSH does (host name and address).
    No ``await`` inside: concurrent connections of one loop cannot interleave their writes."""
    names = [host] + ([addr] if addr and addr != host else [])
    if port and port != 22:
        names = [f"[{n}]:{port}" for n in names]
    line = ",".join(names) + " " + " ".join(key.export_public_key("openssh").decode().split()[:2]) + "\n"
    path = Path(opts.known_hosts_path)
    existing = path.read_text() if path.exists() else ""
    if line in existing:
        return
    with open(path, "a") as f:
        if existing and not existing.endswith("\n"):
            f.write("\n")
        f.write(line)
    err.write(f"orch: {host}: trusted a new host key on first use and recorded it in {path}\n")


async def connect(name: str, opts: SSHOptions, *, user: Optional[str] = None, port: Optional[int] = None,
                  err=None) -> Connection:
    """Connect to one host. Never raises for the host: the result carries the connection or the reason in words
    (``error``); only cancellation propagates. Close with ``Connection.close``."""
    c = Connection(name=name, user=user, port=port)
    t0 = time.monotonic()
    try:
        if opts.accept_new:
            kh = Path(opts.known_hosts_path)
            if not kh.exists():
                kh.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                kh.touch(mode=0o600)
        c.conn = await asyncio.wait_for(
            asyncssh.connect(name, client_factory=lambda: _Client(c, opts.accept_new), **opts.asyncssh_options(user, port)),
            timeout=opts.connect_timeout)
    except Exception as e:  # noqa: BLE001 - every failure becomes words
        c.error = describe_connect_error(e, timeout=opts.connect_timeout, known_hosts=opts.known_hosts,
                                         key_problem=c.key_status, user=user)
        if not isinstance(e, asyncssh.HostKeyNotVerifiable):
            c.key_status = None
        elif c.key_status is None:
            c.key_status = "unknown"
        return c
    c.connect_s = time.monotonic() - t0
    if c.new_key is not None:
        _record_host_key(opts, *c.new_key, err=err or sys.stderr)
        c.key_status = "accepted-new"
    else:
        c.key_status = "known"
    return c


async def connect_hosts(hostfile, opts: SSHOptions, indices: Optional[Iterable[int]] = None,
                        err=None) -> dict[int, Connection]:
    """Connect to the hostfile's hosts at ``indices`` (default: every host that is not local), all at once.

    Host entries with the same (name, user, port) share one connection. Never raises for a host.
    Close them with ``close_connections`` (also when this is cancelled: it closes what it made).
    """
    if indices is None:
        indices = [i for i, h in enumerate(hostfile.hosts) if not h.is_local]
    by_key: dict[tuple, list[int]] = {}
    for i in indices:
        h = hostfile.hosts[i]
        by_key.setdefault((h.name, h.user, h.port), []).append(i)
    keys = list(by_key)
    tasks = [asyncio.ensure_future(connect(n, opts, user=u, port=p, err=err)) for n, u, p in keys]
    try:
        made = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await close_connections({i: c for i, c in enumerate(done) if isinstance(c, Connection)})
        raise
    return {i: c for key, c in zip(keys, made) for i in by_key[key]}


async def close_connections(conns: dict[Any, Connection], timeout: float = 3.0) -> None:
    """Close every connection of a ``connect_hosts`` result (shared ones once), bounded by ``timeout``."""
    seen = list({id(c): c for c in conns.values() if c.conn is not None}.values())
    for c in seen:
        c.close()
    await asyncio.gather(*(c.wait_closed(timeout) for c in seen))
