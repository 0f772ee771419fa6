#!/usr/bin/env python3
"""Weights to every host: ``orch stage`` vs ``scp`` to every host at once vs ``mlx_lm.share``, one run.

    sudo python benchmarks/stage.py [--mib 256] [--reps 2] [--mbit 1000]

Builds 4 namespace hosts with real sshd, each with its own disk (tests/netns_disks.py: a private
tmpfs per host, so four copies are four copies), and shapes to ``--mbit`` (tc tbf) every ring link in
both directions and the controller's own link (the bridge every host hangs off, in the root namespace:
what the controller sends to any host crosses it, as a laptop's one NIC). A model-like folder of
``--mib`` MiB (three safetensors-like files of random bytes, a tokenizer, a config) is then put on
every host, alternately, ``--reps`` times each:

* **scp** (the anchor): OpenSSH ``scp -r`` from the controller to all four hosts at once, a fresh
  destination each time;
* **orch stage, first run**: ``orch stage SRC --hostfile H --to DEST``, a fresh DEST each time;
* **orch stage, second run**: the same command again (every host already has every file);
* **mlx_lm.share** (recorded): host0 holds the folder, ``mlx_lm share --path P --dst D`` on the four
  hosts under ``orch run`` (MLX ring backend over the same shaped ring links). It has no controller:
  the source is one of the ring's hosts.

Each time is the wall clock of the whole command. Prints medians, the ratios orch/scp (target <= 0.5,
the physical limit about 0.25: each host must receive the bytes once, and the chain keeps every link
busy at once), second/first (target <= 0.25) and mlx_lm.share/scp, and checks the bytes on every host.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns import netns_available  # noqa: E402
from tests.netns_disks import DiskCluster  # noqa: E402


def make_model(root: Path, mib: int) -> dict[str, str]:
    """Three weight shards, a tokenizer and a config adding up to ``mib`` MiB; {rel: sha256}."""
    total = mib << 20
    small = {"config.json": 1_500, "tokenizer.json": 2_000_000}
    left = total - sum(small.values())
    shards = [left * 2 // 5, left * 2 // 5]
    shards.append(left - sum(shards))
    sizes = {f"model-0000{i + 1}-of-00003.safetensors": s for i, s in enumerate(shards)} | small
    out = {}
    for rel, size in sizes.items():
        h = hashlib.sha256()
        with open(root / rel, "wb") as f:
            left_b = size
            while left_b:
                b = os.urandom(min(left_b, 8 << 20))
                f.write(b)
                h.update(b)
                left_b -= len(b)
        out[rel] = h.hexdigest()
    return out


def timed(argv: list[str], *, timeout: float = 600, env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    return time.perf_counter() - t0, p


def shape_all(c: DiskCluster, mbit: int) -> None:
    for i in range(c.n):
        c.shape(i, c.hosts[i].right_iface, mbit)
        c.shape(i, c.hosts[i].left_iface, mbit)
    burst = max(96, int(mbit * 1000 / 8 / 100))
    subprocess.run(["tc", "qdisc", "replace", "dev", c.bridge, "root", "tbf", "rate", f"{mbit}mbit",
                    "burst", f"{burst}kb", "latency", "400ms"], check=True, timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mbit", type=int, default=1000)
    ap.add_argument("--no-share", action="store_true", help="skip mlx_lm.share")
    ap.add_argument("--empty-bashrc", action="store_true",
                    help="the hosts see an empty ~/.bashrc (this box's runs pyenv init, ~0.3 s per SSH command; a Mac's "
                         "default zsh reads no rc file for one); scp's SFTP subsystem never starts a shell")
    args = ap.parse_args()
    ok, why = netns_available()
    if not ok:
        print(f"cannot run: {why}")
        return 1
    work = Path(tempfile.mkdtemp(prefix="orch-stage-bench-"))
    src = work / "model"
    src.mkdir()
    want = make_model(src, args.mib)
    total = sum((src / r).stat().st_size for r in want)
    disk_mb = args.mib * 5 + 256
    times: dict[str, list[float]] = {"scp": [], "stage": [], "stage_again": [], "share": []}
    notes: list[str] = []
    c = DiskCluster(4, disk_mb=disk_mb, empty_bashrc=args.empty_bashrc)
    try:
        c.start()
        hf = work / "hosts.json"
        hf.write_text(json.dumps({"backend": "ring", "hosts": [
            {"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c.hosts]}))
        shape_all(c, args.mbit)
        ssh = ["--ssh-config", c.ssh_config_path, "--known-hosts", c.known_hosts_path]
        orch = [sys.executable, "-m", "orchestrator"]
        for rep in range(args.reps):
            dest = f"{c.disk}/scp{rep}"
            procs = [subprocess.Popen(["scp", "-q", "-r", "-F", c.ssh_config_path, str(src), f"{h.name}:{dest}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for h in c.hosts]
            t0 = time.perf_counter()
            outs = [p.communicate(timeout=900)[0] for p in procs]
            times["scp"].append(time.perf_counter() - t0)
            assert all(p.returncode == 0 for p in procs), outs
            for i in range(c.n):
                if rep == 0:
                    assert c.sha256s(i, dest) == want, f"scp host{i}"
                c.disk_exec(i, f"rm -rf {dest}")

            dest = f"{c.disk}/stage{rep}"
            cmd = orch + ["stage", str(src), "--hostfile", str(hf), "--to", dest, "--python", sys.executable,
                          "--json", *ssh]
            t, p = timed(cmd)
            assert p.returncode == 0, p.stdout + p.stderr
            s = json.loads(p.stdout)
            times["stage"].append(t)
            print(f"rep {rep}: scp {times['scp'][-1]:.2f}s  orch stage {t:.2f}s (its own wall {s['wall_s']:.2f}s: {s['phases']}; "
                  f"{s['sent_by_controller'] / 2**20:.0f} MiB left the controller; per host GB/s "
                  f"{[h['gb_per_s'] for h in s['hosts']]}, relay CPU s {[h['relay_cpu_s'] for h in s['hosts']]}; "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            if rep == 0:
                for i in range(c.n):
                    assert c.sha256s(i, dest) == want, f"stage host{i}"
            t, p = timed(cmd)
            assert p.returncode == 0, p.stdout + p.stderr
            s2 = json.loads(p.stdout)
            assert s2["sent_by_controller"] == 0, s2
            times["stage_again"].append(t)
            print(f"rep {rep}: orch stage again {t:.2f}s (moved {s2['sent_by_controller']} bytes; its own wall "
                  f"{s2['wall_s']:.2f}s: {s2['phases']}; checked {[h['checked'] for h in s2['hosts']]})", flush=True)
            for i in range(c.n):
                c.disk_exec(i, f"rm -rf {dest}")

        if not args.no_share:
            c.disk_exec(0, f"mkdir -p {c.disk}/share-src && cp -r {src}/. {c.disk}/share-src/")
            for rep in range(args.reps):
                dst = f"{c.disk}/share{rep}"
                cmd = orch + ["run", "--hostfile", str(hf), "--python", sys.executable, "--run-dir",
                              str(work / f"share-run{rep}"), "--quiet", *ssh, "--",
                              "-m", "mlx_lm", "share", "--path", f"{c.disk}/share-src", "--dst", dst,
                              "--tmpdir", c.disk]
                t, p = timed(cmd)
                if p.returncode != 0:
                    notes.append(f"mlx_lm.share failed (exit {p.returncode}): {(p.stdout + p.stderr)[-1500:]}")
                    print(notes[-1])
                    break
                times["share"].append(t)
                print(f"rep {rep}: mlx_lm.share {t:.2f}s", flush=True)
                if rep == 0:
                    for i in range(1, c.n):
                        got = c.sha256s(i, dst)
                        if got != want:
                            notes.append(f"mlx_lm.share: host{i} has {sorted(got)} (not the source's bytes)")
                for i in range(1, c.n):
                    c.disk_exec(i, f"rm -rf {dst}")
    finally:
        try:
            subprocess.run(["tc", "qdisc", "del", "dev", c.bridge, "root"], capture_output=True, timeout=10)
        except Exception:  # noqa: BLE001
            pass
        c.teardown()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    print()
    print(f"{total / 2**20:.0f} MiB to 4 hosts, links and the controller's link at {args.mbit} Mbit/s, {args.reps} reps each"
          + (", hosts with an empty ~/.bashrc" if args.empty_bashrc else ", hosts with this box's ~/.bashrc"))
    for k, v in times.items():
        if v:
            print(f"  {k:<12} median {med[k]:6.2f}s   runs " + " ".join(f"{x:.2f}" for x in v))
    one_link = total * 8 / (args.mbit * 1e6)
    print(f"  one link's time for the bytes once: {one_link:.2f}s (the physical limit)")
    r = med["stage"] / med["scp"]
    print(f"orch stage / scp to every host at once: {r:.3f}  (target <= 0.5; limit ~0.25)")
    r2 = med["stage_again"] / med["stage"]
    print(f"orch stage second run / first run:      {r2:.3f}  (target <= 0.25)")
    if "share" in med:
        print(f"mlx_lm.share / scp:                     {med['share'] / med['scp']:.3f}")
        print(f"orch stage / mlx_lm.share:              {med['stage'] / med['share']:.3f}")
    for n in notes:
        print("note:", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
