"""Collection brings home only what fits the limits, and never overwrites the controller's own files.

The remote host is an in-process asyncssh SFTP server on 127.0.0.1 working on the real filesystem,
so names, sizes and types come from a real listing. Sizes are checked before anything is downloaded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator.remote.ssh import asyncssh
import pytest

from orchestrator.remote import collect

pytestmark = pytest.mark.timeout(60)


class _SFTPHost:
    def __init__(self):
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")

    async def __aenter__(self):
        self.server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[self.host_key], sftp_factory=True,
            authorized_client_keys=asyncssh.import_authorized_keys(self.client_key.export_public_key().decode()))
        port = self.server.sockets[0].getsockname()[1]
        self.conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, client_keys=[self.client_key], config=None)
        self.sftp = await self.conn.start_sftp_client()
        return self.sftp

    async def __aexit__(self, *exc):
        self.sftp.exit()
        self.conn.close()
        await self.conn.wait_closed()
        self.server.close()
        await self.server.wait_closed()


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _pull(remote: Path, local: Path, prefix=(), **kw) -> collect.CollectReport:
    report = collect.CollectReport()

    async def go():
        async with _SFTPHost() as sftp:
            await collect.pull_files(sftp, str(remote), local, list(prefix), report, **kw)

    asyncio.run(go())
    return report


CONTROLLER_NAMES = ["summary.json", "events.jsonl", "logs/rank0.log", "report.html", "report/loss.png", "plan.json",
                    "mlx-hostfile.json", "staging.json", ".orch.lock", "hosts/h1/x.txt", "Summary.JSON"]


def test_the_controllers_names_are_never_written_by_a_remote_file(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "run"
    _write(remote, {name: f"remote {name}".encode() for name in CONTROLLER_NAMES} | {"stats.json": b"{}"})
    local.mkdir()
    (local / "summary.json").write_text("controller's")
    report = _pull(remote, local, fallback_prefix=["hosts", "h0"])
    assert (local / "summary.json").read_text() == "controller's"
    assert (local / "stats.json").read_text() == "{}"
    top = sorted(p.name for p in local.iterdir())
    assert top == ["hosts", "stats.json", "summary.json"], top  # report.html, .orch.lock, ... were not created
    for name in CONTROLLER_NAMES:
        assert (local / "hosts" / "h0" / name).read_text() == f"remote {name}"
    assert report.files == len(CONTROLLER_NAMES) + 1 and not report.errors


def test_without_a_fallback_reserved_names_are_skipped_with_a_note(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "run"
    _write(remote, {"report.html": b"<script>", ".orch.lock": b"x", "metrics.csv": b"1,2"})
    local.mkdir()
    report = _pull(remote, local)
    assert sorted(p.name for p in local.iterdir()) == ["metrics.csv"]
    assert sorted(report.skipped) == [".orch.lock (its name is the controller's; not overwritten)",
                                      "report.html (its name is the controller's; not overwritten)"]


def test_a_file_over_the_per_file_limit_is_not_downloaded(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "run"
    _write(remote, {"small.txt": b"ok"})
    with open(remote / "huge.bin", "wb") as f:  # sparse: 3 GiB in the listing, nothing on disk
        f.truncate(3 << 30)
    local.mkdir()
    report = _pull(remote, local)  # the default limits
    assert sorted(p.name for p in local.iterdir()) == ["small.txt"]
    assert report.skipped == ["huge.bin (3.0 GiB, over the 1.0 GiB per-file limit)"]
    assert report.bytes == 2


def test_a_shared_budget_caps_the_total_over_hosts(tmp_path):
    local = tmp_path / "run"
    local.mkdir()
    limits = collect.Limits(total_bytes=2500)
    budget = collect.Budget()
    reports = []
    for host in ("h0", "h1"):
        remote = tmp_path / f"remote-{host}"
        _write(remote, {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
        reports.append(_pull(remote, local, ["hosts", host], limits=limits, budget=budget))
    got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.bin"))
    assert got == ["hosts/h0/a.bin", "hosts/h0/b.bin"]
    assert reports[1].skipped == ["a.bin (1000 B, over the 2.4 KiB total limit)",
                                  "b.bin (1000 B, over the 2.4 KiB total limit)"]
    assert budget.bytes == 2000 and budget.files == 2


def test_a_download_never_reads_past_the_announced_size(tmp_path):
    remote = tmp_path / "remote"
    _write(remote, {"log.txt": b"0123456789"})  # grew to 10 bytes after a listing said 4

    async def go():
        async with _SFTPHost() as sftp:
            return await collect._download(sftp, str(remote / "log.txt"), tmp_path / "got.txt", 4)

    assert asyncio.run(go()) == 4 and (tmp_path / "got.txt").read_bytes() == b"0123"


class _StalledSFTP:
    """A host that stopped answering: every request waits forever."""

    async def readdir(self, path):
        await asyncio.Event().wait()

    async def lstat(self, path):
        await asyncio.Event().wait()


def test_a_host_that_stops_answering_is_given_up_on_in_time(tmp_path):
    local = tmp_path / "run"
    local.mkdir()
    limits = collect.Limits(host_timeout_s=0.5, list_timeout_s=0.5)
    report = collect.CollectReport()

    async def go():
        cp = await collect.find_checkpoint(_StalledSFTP(), "h0", "/r", limits)
        await collect.pull_files(_StalledSFTP(), "/r", local, [], report, limits=limits)
        return cp

    assert asyncio.run(asyncio.wait_for(go(), 20)) is None
    assert report.errors == ["collection stopped after 0.5s; files not yet downloaded stay in /r"]
