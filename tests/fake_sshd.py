"""An asyncssh server in a thread, for unit tests of commands that only *send* SSH commands.

It runs nothing: each command is recorded as ``(user, command)`` and answered by
``answer`` (exit 0 with no output unless a test says otherwise). Integration
tests use real OpenSSH ``sshd`` in network namespaces instead (``tests/netns.py``).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional

from orchestrator.remote.ssh import asyncssh

Answer = Callable[[str, str], tuple[str, int]]


class FakeSSHD:
    def __init__(self, tmp_path: Path, answer: Optional[Answer] = None):
        self.answer: Answer = answer or (lambda user, command: ("", 0))
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        client = asyncssh.generate_private_key("ssh-ed25519")
        self.key_path = tmp_path / "id_ed25519"
        client.write_private_key(str(self.key_path))
        self.authorized = asyncssh.import_authorized_keys(client.export_public_key().decode())
        self.commands: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            async def session(process):
                user = process.get_extra_info("username")
                self.commands.append((user, process.command))
                out, code = self.answer(user, process.command)
                process.stdout.write(out)
                process.exit(code)

            self.server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[self.host_key],
                                                authorized_client_keys=self.authorized, process_factory=session)
            self.port = self.server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def __enter__(self) -> "FakeSSHD":
        self.thread.start()
        assert self.ready.wait(20)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def ssh_config(self, path: Path, hosts: Iterable[str], user: Optional[str] = None) -> Path:
        """Every host name at this server; logged in as ``user``, or as the host's own name."""
        path.write_text("".join(f"Host {h}\n  HostName 127.0.0.1\n  Port {self.port}\n  User {user or h}\n"
                                for h in hosts))
        return path

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} " + " ".join(self.host_key.export_public_key().decode().split()[:2]) + "\n"
