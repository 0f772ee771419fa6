"""Is a host's DEST exactly as its relay last verified it? Asked over SFTP: no shell, no Python started there.

A second ``orch stage`` of the same folder should cost next to nothing. Starting the relay costs an SSH
session, which runs the user's login shell and its rc files (pyenv or conda init: 0.3 s and more per
session), then Python; SFTP is a subsystem (no shell). So the controller first reads the relay's record
(``DEST/.orch-stage/verified.json``: each file's SHA-256, size, mtime and ctime as the relay saw them) and
``lstat``s every file. A file counts as unchanged only if

* its record carries the source's SHA-256 and size, and the file still has that size,
* it still has the record's mtime (SFTP gives whole seconds), and
* the record's mtime lies in an earlier second than its ctime: the relay stamps each file it writes with an
  mtime a second before it renames it into place, so any write since (which sets the mtime to "now", at or
  after that ctime) moves the mtime to another second.

Anything else (no record, another digest, a changed file, no SFTP): False, and the relay scans as usual
(it also compares ctime and inode, and hashes what changed). A write that puts the old mtime back is seen
only by the relay; bit rot only by ``--verify``, which never takes this path.
"""

from __future__ import annotations

import asyncio
import json


def sftp_path(dest: str) -> str:
    """DEST as SFTP names it: a path under the home directory is relative there."""
    return "." if dest == "~" else dest[2:] if dest.startswith("~/") else dest


async def unchanged_over_sftp(conn, dest: str, hashed: "asyncio.Future", timeout: float = 30.0) -> bool:
    """True when every file and folder of the source (``await hashed``: the hashed ``Source``) is in ``dest``
    on the host of ``conn`` (an asyncssh connection) as its relay last verified it."""
    from orchestrator.remote.ssh import asyncssh

    sftp = None
    root = sftp_path(dest)
    try:
        sftp = await asyncio.wait_for(conn.start_sftp_client(), 10)
        async with sftp.open(f"{root}/.orch-stage/verified.json", "rb") as f:
            records = json.loads(await asyncio.wait_for(f.read(4 << 20), 10))
        source = await hashed
        names = [f"{root}/{f.rel}" for f in source.files] + [f"{root}/{d}" for d in source.dirs]
        attrs = await asyncio.wait_for(asyncio.gather(*(sftp.lstat(n) for n in names)), timeout)
    except Exception:  # noqa: BLE001 - no SFTP, no record, a file missing: the relay decides
        return False
    finally:
        if sftp is not None:
            sftp.exit()
    if not isinstance(records, dict):
        return False
    for f, a in zip(source.files, attrs):
        rec = records.get(f.rel)
        if not (isinstance(rec, list) and len(rec) == 5 and rec[0] == f.sha and rec[1] == f.size):
            return False
        mtime_s, ctime_s = rec[2] // 10**9, rec[3] // 10**9
        if not (a.type == asyncssh.FILEXFER_TYPE_REGULAR and a.size == f.size and a.mtime == mtime_s
                and mtime_s < ctime_s):
            return False
    return all(a.type == asyncssh.FILEXFER_TYPE_DIRECTORY for a in attrs[len(source.files):])
