#!/usr/bin/env python3
"""Launch latency over SSH: ``orch run`` vs ``mlx.launch`` on four network-namespace hosts.

    sudo python benchmarks/launch_latency_ssh.py [--runs 7]

Builds its own 4-host ring (tests/netns.py: network namespaces, real sshd, a
/30 per ring link) and tears it down at the end. Both launchers start the same
trivial script (recipes/allsum_check.py: init the ring, one all_sum, exit) on
the four hosts over SSH, alternately, after one warm-up each (so both find
warm OS caches, and orch finds its staged files on the hosts). The time is the
wall clock of the whole command, from exec to exit, as a user experiences it.

* orch: ``python -m orchestrator run SCRIPT --hostfile H --ssh-config C --known-hosts K``
  (one asyncssh connection per host, content-addressed staging, start gate).
* mlx.launch: ``mlx.launch --hostfile F --backend ring --python PY -- SCRIPT``.
  It runs plain ``ssh HOST``, so a wrapper ``ssh`` first on its PATH adds
  ``-F <cluster ssh_config>``. It needs the script at the same path on every
  host: the namespace hosts share this filesystem. Its hostfile lists, per
  host, the address on the link to the previous host (what orch's planner
  picks from the /30s). It gets an open, idle stdin, as from a terminal.

Prints the median of each and the ratio orch / mlx.launch. ``--baseline REF`` also times orch as
of git commit REF (a temporary ``git worktree``), in the same alternation: before and after a change,
measured in one run on the same loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import IDLE, ROOT, alternate, ratio, result_line, summary, timed_run  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.netns import NetnsCluster, netns_available  # noqa: E402

TARGET = 0.6


def mlx_launch_argv() -> list[str]:
    exe = Path(sys.executable).with_name("mlx.launch")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def event_marks(run_dir: Path, exec_t: float) -> dict[str, float]:
    """``first KIND`` / ``last KIND`` -> seconds after ``exec_t`` that the controller received it."""
    out: dict[str, float] = {}
    try:
        lines = (run_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
            at = float(e.get("recv_t") or e["t"]) - exec_t
        except (ValueError, KeyError, TypeError):
            continue
        kind = str(e.get("kind"))
        out.setdefault(f"first {kind}", at)
        out[f"last {kind}"] = at
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs of each launcher (default 7, at least 5)")
    ap.add_argument("--script", default=str(ROOT / "recipes" / "allsum_check.py"))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per run")
    ap.add_argument("--timeline", action="store_true",
                    help="also print, per event kind of orch's events.jsonl, when it first and last arrived "
                         "(median over runs, seconds after exec): where orch's launch time goes")
    ap.add_argument("--baseline", metavar="REF", help="also time orch as of this git commit (e.g. HEAD~3)")
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    ok, why = netns_available()
    if not ok:
        print(f"launch_latency_ssh: {why}", file=sys.stderr)
        return 2
    script = str(Path(args.script).resolve())

    with NetnsCluster(4) as c, tempfile.TemporaryDirectory(prefix="orch-bench-") as tmpdir:
        tmp = Path(tmpdir)
        base_tree = None
        if args.baseline:
            base_tree = tmp / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.baseline],
                           check=True)
        orch_hosts = tmp / "orch-hosts.json"
        orch_hosts.write_text(json.dumps({"backend": "ring", "hosts": [
            {"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c.hosts]}))
        mlx_hosts = tmp / "mlx-hosts.json"
        mlx_hosts.write_text(json.dumps({"backend": "ring", "hosts": [
            {"ssh": h.name, "ips": [h.left_ip]} for h in c.hosts]}))
        bindir = tmp / "bin"
        bindir.mkdir()
        wrapper = bindir / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {c.ssh_config_path} \"$@\"\n")
        wrapper.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # bytecode caches, as a user has
        mlx_env = {**env, "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}"}

        marks: dict[str, list[float]] = {}

        def orch(i: int, tree: Path = ROOT, tag: str = "") -> float:
            rd = tmp / f"orch-run{tag}-{i}"

            def succeeded(r) -> bool:
                try:
                    return json.loads((rd / "summary.json").read_text())["status"] == "succeeded"
                except (OSError, ValueError, KeyError):
                    return False

            exec_t = time.time()
            r = timed_run([sys.executable, "-m", "orchestrator", "run", script, "--hostfile", str(orch_hosts),
                           "--ssh-config", c.ssh_config_path, "--known-hosts", c.known_hosts_path,
                           "--python", sys.executable, "--run-dir", str(rd), "--quiet"],
                          check=succeeded, env=env, cwd=tree, timeout=args.timeout, stdin=IDLE, merge_stderr=True)
            if i > 0 and not tag:
                for key, at in event_marks(rd, exec_t).items():
                    marks.setdefault(key, []).append(at)
                marks.setdefault("exit", []).append(r.seconds)
            return r.seconds

        def mlx(i: int) -> float:
            port = random.randrange(20000, 60000)
            return timed_run([*mlx_launch_argv(), "--hostfile", str(mlx_hosts), "--backend", "ring",
                              "--python", sys.executable, "--starting-port", str(port), "--", script],
                             check=lambda r: r.stdout.count("OK") == 4, env=mlx_env, cwd=ROOT, timeout=args.timeout,
                             stdin=IDLE, merge_stderr=True).seconds

        contenders = {"orch": orch}
        if base_tree is not None:
            contenders[f"orch@{args.baseline}"] = lambda i: orch(i, base_tree, "-base")
        contenders["mlx.launch"] = mlx
        errors: list = []
        # Round 0 is the warm-up of each.
        times = alternate(contenders, args.runs, warmup=1, failures=errors,
                          progress=lambda i, name, t, warm: print(
                              f"  {'warm-up' if warm else f'run {i}':>8}  {name:<14} {t:6.3f} s", flush=True))
        failures = [f"{name} run {i} exited {e.run.returncode or 1}:\n{e.run.stdout[-2000:]}" for i, name, e in errors]
        if base_tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
        if failures:
            print("\n".join(failures), file=sys.stderr)
            if not all(times.values()):
                return 1

    # orch retires each run's remote directory for a later run to delete; delete the last ones here.
    for d in (Path.home() / ".cache" / "mlx-orch" / "runs").glob(".trash-orch-run-*"):
        shutil.rmtree(d, ignore_errors=True)
    med = {k: summary(v).median for k, v in times.items()}
    print()
    print(f"launch latency over SSH, 4 namespace hosts, {Path(script).name}, {args.runs} runs each, alternating")
    for name, v in times.items():
        print(f"  {name:<14} median {med[name]:6.3f} s   min {min(v):6.3f}   max {max(v):6.3f}")
    for name in times:
        if name != "mlx.launch":
            print(f"  ratio {name} / mlx.launch = {ratio(times[name], times['mlx.launch']):.2f}  (target <= {TARGET})")
    if args.timeline and marks:
        print("\norch's timeline (median seconds after exec, over its timed runs):")
        for key, v in sorted(marks.items(), key=lambda kv: statistics.median(kv[1])):
            print(f"  {statistics.median(v):6.3f}  {key}")
    result_line("launch_latency_ssh", hosts=4, script=Path(script).name, runs=args.runs, times=times,
                ratio_to_median={k: ratio(v, times["mlx.launch"]) for k, v in times.items() if k != "mlx.launch"},
                ratio_to_min={k: ratio(v, times["mlx.launch"], to="min") for k, v in times.items() if k != "mlx.launch"},
                failures=len(failures), cpus=os.cpu_count())
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
