#!/usr/bin/env python3
"""Why ``orch stage``'s first leg is plain TCP: 256 MiB controller -> one namespace host, SSH channel vs TCP + sendfile.

    sudo python benchmarks/stage_first_leg.py

The controller -> first host leg of ``orch stage`` could go through the SSH connection (an exec channel
into ``cat > /dev/null``: asyncssh's cipher and packet handling in this process, sshd and cat on the host)
or over a TCP connection to the relay the SSH connection started, authenticated by a token (``sendfile``
from the page cache, no cipher). Unshaped link; prints each one's time, rate and this process's CPU time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.remote.ssh import asyncssh  # noqa: E402
from tests.netns import NetnsCluster  # noqa: E402

MIB = 256
PORT = 7777
SINK = "import socket\ns=socket.socket();s.bind(('0.0.0.0',%d));s.listen(1);c,_=s.accept()\nwhile c.recv(1<<20): pass\n"


async def measure(c: NetnsCluster, data: str) -> None:
    chunk = os.urandom(1 << 20)
    conn = await asyncssh.connect(**c.asyncssh_kwargs(0))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        p = await conn.create_process("cat > /dev/null", encoding=None)
        for _ in range(MIB):
            p.stdin.write(chunk)
            await p.stdin.drain()
        p.stdin.write_eof()
        await p.wait()
        ssh_t, ssh_cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        conn.close()
    sink = c.popen(0, [sys.executable, "-c", SINK % PORT])
    await asyncio.sleep(0.5)

    def send() -> None:
        s = socket.create_connection((c.hosts[0].mgmt_ip, PORT), timeout=30)
        with open(data, "rb") as f:
            s.sendfile(f)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        s.close()

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.to_thread(send)
    tcp_t, tcp_cpu = time.perf_counter() - t0, time.process_time() - c0
    sink.wait(10)
    n = MIB << 20
    print(f"{MIB} MiB controller -> host, unshaped, load {os.getloadavg()[0]:.1f}: "
          f"SSH channel {ssh_t:.2f}s ({n / ssh_t / 1e6:.0f} MB/s, controller CPU {ssh_cpu:.2f}s); "
          f"TCP + sendfile {tcp_t:.2f}s ({n / tcp_t / 1e6:.0f} MB/s, controller CPU {tcp_cpu:.2f}s); "
          f"ratio {tcp_t / ssh_t:.3f}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="orch-leg-") as tmp:
        data = os.path.join(tmp, "data.bin")
        with open(data, "wb") as f:
            for _ in range(MIB):
                f.write(os.urandom(1 << 20))
        with NetnsCluster(1) as c:
            asyncio.run(measure(c, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
