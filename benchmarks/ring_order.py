#!/usr/bin/env python3
"""The fastest ring: all_sum bandwidth in the hostfile's order vs ``--ring-order measured`` on a full mesh.

    sudo python benchmarks/ring_order.py [--runs 3] [--slow-mbit 30] [--size-mib 2]

Builds four network-namespace hosts (tests/netns.py: real sshd, a /30 per veth "cable") wired as a
full mesh (the ring's four cables plus the chords host0-host2 and host1-host3), shapes the cable
host0-host1 with ``tc tbf`` to ``--slow-mbit`` each way, and runs ``orchestrator/runtime/probe_collective.py``
(a checked all_sum, median of ``--iters``) through ``orch run`` over SSH, alternately in the hostfile's
order (host0 -> host1 -> host2 -> host3, which uses the slow cable) and with ``--ring-order measured``.
Prints each run's bus bandwidth, the medians, their ratio (the anchor is the hostfile order in the same
run), the order chosen and how long the link measurement took. Removes the shaping and the hosts at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns import NetnsCluster, netns_available  # noqa: E402

PROBE = ROOT / "orchestrator" / "runtime" / "probe_collective.py"
TARGET = 1.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each order, alternating (default 3)")
    ap.add_argument("--slow-mbit", type=float, default=30.0, help="rate of the slow cable host0-host1 (default 30)")
    ap.add_argument("--size-mib", type=float, default=2.0, help="all_sum size (default 2 MiB)")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    ok, why = netns_available()
    if not ok:
        print(f"skipped: {why}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="orch-ringorder-"))
    ends = [(0, "ring_r"), (1, "ring_l")]
    results: dict[str, list[float]] = {"hostfile": [], "measured": []}
    chosen, took = "", []
    try:
        with NetnsCluster(4) as c:
            chords = c.full_mesh()
            ips = {h.index: [f"{h.left_ip}/30", f"{h.right_ip}/30"] for h in c.hosts}
            for ln in chords:
                ips[ln.a].append(f"{ln.ip_a}/30")
                ips[ln.b].append(f"{ln.ip_b}/30")
            hf = tmp / "mesh.json"
            hf.write_text(json.dumps({"backend": "ring", "hosts": [
                {"ssh": h.name, "ips": ips[h.index], "python": sys.executable} for h in c.hosts]}))
            try:
                for i, iface in ends:
                    c.shape(i, iface, args.slow_mbit)
                for k in range(args.runs):
                    for order in ("hostfile", "measured"):
                        rd = tmp / f"{order}-{k}"
                        p = subprocess.run(
                            [sys.executable, "-m", "orchestrator", "run", str(PROBE), "--hostfile", str(hf),
                             "--ssh-config", c.ssh_config_path, "--known-hosts", c.known_hosts_path,
                             "--python", sys.executable, "--run-dir", str(rd), "--ring-order", order, "--quiet",
                             "--", "--size-mib", f"{args.size_mib:g}", "--iters", str(args.iters), "--latency-iters", "3"],
                            cwd=tmp, capture_output=True, text=True, timeout=300)
                        if p.returncode != 0:
                            print(p.stderr[-3000:])
                            return 1
                        m = json.loads((rd / "summary.json").read_text())["metrics"]
                        results[order].append(m["busbw_GBps"])
                        line = re.search(r"ring order measured: ([^;]+);", p.stderr)
                        if line:
                            chosen = line.group(1)
                        t = re.search(r"links measured in ([0-9.]+)s", p.stderr)
                        if t:
                            took.append(float(t.group(1)))
                        print(f"run {k} {order:9s} busbw {m['busbw_GBps'] * 8:.3f} Gbit/s "
                              f"(all_sum of {args.size_mib:g} MiB, median {m['allsum_s'] * 1000:.0f} ms)", flush=True)
            finally:
                for i, iface in ends:
                    c.unshape(i, iface)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    slow, fast = statistics.median(results["hostfile"]), statistics.median(results["measured"])
    print(f"\nslow cable host0-host1 at {args.slow_mbit:g} Mbit/s; measured ring: {chosen}; "
          f"link measurement {statistics.median(took):.1f} s (median)")
    print(f"bus bandwidth, median of {args.runs}: hostfile order {slow * 8:.3f} Gbit/s, measured order {fast * 8:.3f} Gbit/s, "
          f"ratio {fast / slow:.1f}x (target >= {TARGET}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
