"""Mixed speeds: equal per-rank batches vs ``--balance speed``, with one rank really slower.

    python benchmarks/balance.py [--repeats 5] [--quota 0.5] [--steps 160] [--block 10] [--batch-size 512]

Two ranks of ``orch run`` on this machine, each pinned to its own core; the
second one runs in a cgroup (v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``) that
gives it ``--quota`` of a core (0.5: half as fast), the way a MacBook Air sits
next to a Mac Studio. The ranks run at nice -15 (as root) so that other work
on a shared box disturbs them less; the quota, not the neighbours, should set
their speeds.

Each repeat is one ``--balance speed`` run whose steps alternate, in blocks of
``--block`` steps, between **equal** shares (``--batch-size`` each, the
weights equal too) and the **balanced** shares the runtime's balancer chose
(it measures and re-balances throughout, as in any run), so both arms see the
machine at nearly the same moments: on this 2-vCPU VM the speed of a core
drifts by 2x within a minute, which made separate runs per arm unreadable.
Then **solo** runs: each rank's condition alone (``-n 1``, no communication)
at the share the balancer settled on; the sum of the two is the *ideal* a
balanced pair can reach.

Throughput is global samples/s from rank 0's step-to-step wall time (the first
step of each block and everything before ``--from-step`` left out). Printed:
each repeat, then the median over repeats. Targets: balanced / equal >= 1.3
when one rank is half as fast, balanced / ideal >= 0.9. Needs root for the
cgroup (removed at the end, also on failure or SIGTERM).

When started by orch with ``BALANCE_BENCH_ROLE=rank`` this file is the recipe:
it pins itself (``BALANCE_BENCH_PIN``: one CPU per rank, comma-separated),
renices itself (``BALANCE_BENCH_NICE``), joins the cgroup if it is the named
rank (``BALANCE_BENCH_CGROUP=RANK:DIR``), then trains
``benchmarks/bench_mlp.py``'s model with the runtime's Trainer (alternating
blocks: ``BALANCE_BENCH_BLOCK``).
"""

from __future__ import annotations

import os
import sys

ROLE_ENV, PIN_ENV, CGROUP_ENV = "BALANCE_BENCH_ROLE", "BALANCE_BENCH_PIN", "BALANCE_BENCH_CGROUP"
NICE_ENV, BLOCK_ENV = "BALANCE_BENCH_NICE", "BALANCE_BENCH_BLOCK"


def _rank_setup() -> None:
    """Pin this rank to its CPU and move it into the slow cgroup, before any work (even imports) happens."""
    rank = int(os.environ.get("MLX_RANK") or 0)
    pins = [p for p in os.environ.get(PIN_ENV, "").split(",") if p]
    if pins and hasattr(os, "sched_setaffinity"):
        cpu = {int(pins[rank % len(pins)])}
        for tid in os.listdir("/proc/self/task"):  # every thread: MLX's pool may exist already (pre-started rank)
            try:
                os.sched_setaffinity(int(tid), cpu)
            except OSError:
                pass
    nice = os.environ.get(NICE_ENV)
    if nice:  # ahead of the other work on this shared box, so the quota (not the neighbours) sets the speeds
        for tid in os.listdir("/proc/self/task"):
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), int(nice))
            except OSError:
                pass
    slow_rank, _, cgroup = os.environ.get(CGROUP_ENV, "").partition(":")
    if cgroup and int(slow_rank) == rank:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def _alternating_trainer():
    """The runtime's Trainer, with ``--balance speed``'s shares switched off in every other block of steps.

    Blocks of ``BALANCE_BENCH_BLOCK`` steps alternate equal shares (the
    balancer's shares swapped out for the step, so the gradient weights are
    equal too) and the balancer's own shares; the balancer measures and
    decides throughout, exactly as in a normal run. Both arms thus see the
    same machine at (almost) the same moments.
    """
    from orchestrator.runtime.trainer import Trainer

    block = int(os.environ.get(BLOCK_ENV) or 0)

    class AlternatingTrainer(Trainer):
        def train_step(self):
            bal = self.balancer
            if not block or bal is None or (self.step // block) % 2 == 1:
                return super().train_step()
            own = bal.shares
            bal.shares = [self.hp.batch_size] * self.world
            self.sampler.set_shares(bal.shares)
            try:
                return super().train_step()
            finally:
                bal.shares = own
                self.sampler.set_shares(own)

    return AlternatingTrainer


if os.environ.get(ROLE_ENV) == "rank":
    _rank_setup()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_mlp import recipe  # noqa: E402

    from orchestrator.runtime.config import parse_hparams  # noqa: E402
    from orchestrator.runtime.trainer import init_group  # noqa: E402

    hp = parse_hparams(recipe.hparams, prog="balance_bench")
    _alternating_trainer()(recipe, hp, init_group(), "balance_bench").fit()
    sys.exit(0)

# ----------------------------------------------------------------------------- the controller

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()


class CpuLimit:
    """A cgroup holding at most ``quota`` of one CPU; removed on exit (its processes must be gone by then)."""

    def __init__(self, quota: float, period_us: int = 10_000):
        self.quota, self.period = quota, period_us
        self.path: Path | None = None

    def __enter__(self) -> "CpuLimit":
        name = f"orch-balance-bench-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.period))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(self.quota * self.period)))
        else:
            v2 = Path("/sys/fs/cgroup")
            if "cpu" not in (v2 / "cgroup.controllers").read_text().split():
                raise SystemExit("balance.py: no cgroup cpu controller (v1 /sys/fs/cgroup/cpu or v2 cpu.max)")
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{int(self.quota * self.period)} {self.period}")
        return self

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:  # a process still leaving it
                time.sleep(0.1)
        print(f"balance.py: could not remove {self.path}", file=sys.stderr)


def orch_run(n: int, run_dir: Path, args: list[str], env: dict, timeout: float = 300) -> list[dict]:
    """One ``orch run`` of this file as the recipe; returns the run's events."""
    cmd = [sys.executable, "-m", "orchestrator", "run", str(HERE), "-n", str(n), "--run-dir", str(run_dir),
           "--env", f"{ROLE_ENV}=rank"] + [x for k, v in env.items() for x in ("--env", f"{k}={v}")] + ["--", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"balance.py: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def throughput(events: list[dict], global_batch: int, from_step: int) -> float:
    """Global samples/s between rank 0's step events ``from_step`` and the last."""
    steps = sorted((e["step"], e["t"]) for e in events if e.get("kind") == "step" and e.get("rank") == 0)
    window = [(s, t) for s, t in steps if s >= from_step]
    (s0, t0), (s1, t1) = window[0], window[-1]
    return global_batch * (s1 - s0) / (t1 - t0)


def block_throughputs(events: list[dict], global_batch: int, block: int, from_step: int) -> dict[str, float]:
    """Samples/s of the equal and the balanced blocks of an alternating run (rank 0's step-to-step wall time).

    Step ``s`` ran in block ``(s - 1) // block``: even blocks equal, odd ones
    balanced. The first step of each block (the switch) is left out.
    """
    t = {e["step"]: e["t"] for e in events if e.get("kind") == "step" and e.get("rank") == 0}
    time_in = {"equal": 0.0, "balanced": 0.0}
    steps_in = {"equal": 0, "balanced": 0}
    for s in sorted(t):
        if s < from_step or s - 1 not in t or (s - 1) % block == 0:
            continue
        mode = "balanced" if ((s - 1) // block) % 2 else "equal"
        time_in[mode] += t[s] - t[s - 1]
        steps_in[mode] += 1
    return {m: global_batch * steps_in[m] / time_in[m] for m in time_in}


def final_shares(events: list[dict]) -> list[int]:
    rebal = [e for e in events if e.get("kind") == "rebalance" and e.get("rank") == 0]
    return rebal[-1]["shares"]


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the cgroup is removed on the way out
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quota", type=float, default=0.5, help="CPU share of the slow rank's core")
    ap.add_argument("--steps", type=int, default=160, help="steps of the alternating pair run")
    ap.add_argument("--block", type=int, default=10, help="steps per block (equal, balanced, equal, ...)")
    ap.add_argument("--from-step", type=int, default=21, help="first step measured (after the calibration)")
    ap.add_argument("--solo-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=512, help="per rank (equal); the global batch is twice it")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--cpus", default="0,1", help="the CPU of rank 0 and of rank 1")
    ap.add_argument("--nice", type=int, default=-15 if os.geteuid() == 0 else 0,
                    help="nice value of the ranks (root: -15, so other work on the box does not set their speeds)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    fast_cpu, slow_cpu = a.cpus.split(",")
    common = ["--hidden", str(a.hidden), "--optimizer", "sgd", "--lr", "1e-3", "--stats-every", "0",
              "--log-every", "1000", "--samples", str(max(16384, 8 * a.batch_size))]
    B = 2 * a.batch_size
    rows = []
    with CpuLimit(a.quota) as lim, tempfile.TemporaryDirectory(prefix="balance-bench-") as tmp:
        nice = {NICE_ENV: str(a.nice)} if a.nice else {}
        pair_env = {PIN_ENV: f"{fast_cpu},{slow_cpu}", CGROUP_ENV: f"1:{lim.path}", BLOCK_ENV: str(a.block), **nice}
        for rep in range(a.repeats):
            ev = orch_run(2, Path(tmp) / f"pair-{rep}", common + ["--steps", str(a.steps), "--batch-size",
                                                                   str(a.batch_size), "--balance", "speed"], pair_env)
            res: dict = dict(block_throughputs(ev, B, a.block, a.from_step))
            res["shares"] = final_shares(ev)
            res["history"] = [(e["step"], e["shares"], [round(x) for x in e["speeds"]]) for e in ev
                              if e.get("kind") == "rebalance" and e.get("rank") == 0]
            fast_share, slow_share = res["shares"]
            solo_order = [("fast", fast_cpu, fast_share, ""), ("slow", slow_cpu, slow_share, f"0:{lim.path}")]
            if rep % 2:
                solo_order.reverse()
            for name, cpu, share, cg in solo_order:
                env = {PIN_ENV: cpu, **nice, **({CGROUP_ENV: cg} if cg else {})}
                ev = orch_run(1, Path(tmp) / f"solo-{name}-{rep}",
                              common + ["--steps", str(a.solo_steps), "--batch-size", str(share)], env)
                res[f"solo_{name}"] = throughput(ev, share, min(a.from_step, a.solo_steps // 3))
            res["ideal"] = res["solo_fast"] + res["solo_slow"]
            res["balanced_vs_equal"] = res["balanced"] / res["equal"]
            res["balanced_vs_ideal"] = res["balanced"] / res["ideal"]
            res["slow_vs_fast"] = res["solo_slow"] / res["solo_fast"]  # samples/s alone, each at its share
            rows.append(res)
            print(f"repeat {rep}: equal {res['equal']:,.0f}  balanced {res['balanced']:,.0f} (shares {res['shares']})  "
                  f"solo {res['solo_fast']:,.0f} + {res['solo_slow']:,.0f} = ideal {res['ideal']:,.0f}  "
                  f"-> x{res['balanced_vs_equal']:.2f} vs equal, {res['balanced_vs_ideal']:.2f} of ideal; "
                  f"slow/fast per sample {res['slow_vs_fast']:.2f}\n"
                  f"    rebalances (step, shares, measured samples/s): {res['history']}", flush=True)

    def med(key):
        return statistics.median(r[key] for r in rows)

    summary = {k: med(k) for k in ("equal", "balanced", "solo_fast", "solo_slow", "ideal", "balanced_vs_equal",
                                    "balanced_vs_ideal", "slow_vs_fast")}
    summary["shares"] = [r["shares"] for r in rows]
    print(f"\nglobal batch {B}, slow rank at {a.quota:.0%} of a core, {a.repeats} repeats (median; blocks of "
          f"{a.block} steps alternating in each run):")
    print("| equal batches (samples/s) | --balance speed | final shares | ideal (solo sum) | balanced/equal "
          "| balanced/ideal | slow/fast speed |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {summary['equal']:,.0f} | {summary['balanced']:,.0f} | {rows[-1]['shares']} | {summary['ideal']:,.0f} "
          f"| **{summary['balanced_vs_equal']:.2f}x** | **{summary['balanced_vs_ideal']:.2f}** "
          f"| {summary['slow_vs_fast']:.2f} |")
    if a.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
