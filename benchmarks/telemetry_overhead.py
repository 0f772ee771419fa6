"""Cost of the memory telemetry: a memory sample (and event) every step vs never.

    python benchmarks/telemetry_overhead.py [--ranks 2] [--repeats 3] [--steps 120] [--toggle 10]

Three measurements, the anchor (no sampling) always taken in the same run:

1. In-run alternation (the precise one): ``orch run benchmarks/bench_mlp.py
   -- --stats-toggle K`` samples memory after every step for K steps, then
   for none for K steps, and so on, in one job; rank 0 reports the median wall
   time of a step (start to next start, so the sample and its event count)
   in each state. Machine load drifts alike for both.
2. Whole runs, alternating: ``--stats-every 1`` vs ``--stats-every 0`` jobs,
   throughput on the wall clock after a warm-up (noisier: runs see different load).
3. Micro: the time of one ``MemorySampler.sample`` + event encoding in this
   process, as a share of a step.

Target: overhead < 1 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import scaling  # benchmarks/scaling.py: the orch launching and event parsing
from scaling import BENCH, BenchError, run_measured


def toggle_once(n: int, steps: int, toggle: int, common: list[str], run_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "orchestrator", "run", str(BENCH), "-n", str(n), "--quiet", "--run-dir", str(run_dir),
           "--", "--steps", str(steps), "--stats-toggle", str(toggle), *common]
    r, _, _ = run_measured(cmd, timeout)
    if r.returncode != 0:
        raise BenchError(f"orch exited {r.returncode}: {shlex.join(cmd)}\n{r.stderr.decode()[-2000:]}")
    line = next(ln for ln in (run_dir / "logs" / "rank-0.log").read_text().splitlines() if "BENCH_JSON " in ln)
    tog = json.loads(line.split("BENCH_JSON ", 1)[1])["toggle"]
    with open(run_dir / "events.jsonl") as f:
        memory_events = sum(1 for ln in f if '"kind":"memory"' in ln)
    tog["memory_events"] = memory_events
    return tog


def micro_cost(samples: int = 2000) -> float:
    """Seconds per MemorySampler.sample() + protocol encoding, in this process."""
    from orchestrator import protocol
    from orchestrator.runtime.telemetry import MemorySampler

    sampler = MemorySampler()
    for i in range(50):
        protocol.encode("memory", 0, **sampler.sample(i))
    t0 = time.perf_counter()
    for i in range(samples):
        line = protocol.encode("memory", 0, **sampler.sample(i)).encode()
        os.write(devnull, line)
    return (time.perf_counter() - t0) / samples


devnull = os.open(os.devnull, os.O_WRONLY)


def main() -> None:
    scaling.exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--toggle", type=int, default=10)
    ap.add_argument("--model-args", default="")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--markdown", help="append the table to this file")
    a = ap.parse_args()
    common = shlex.split(a.model_args)
    info = scaling.machine_info()
    print(f"# machine: {info}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="orch-telemetry-"))
    started = time.time()
    try:
        toggles, ab_on, ab_off, step_times = [], [], [], []
        for rep in range(a.repeats):
            tog = toggle_once(a.ranks, a.steps, a.toggle, common, tmp / f"tog-{rep}", a.timeout)
            toggles.append(tog)
            print(f"  rep {rep} in-run: on {tog['on_median_s'] * 1e3:.2f} ms, off {tog['off_median_s'] * 1e3:.2f} ms "
                  f"({tog['on_median_s'] / tog['off_median_s'] - 1:+.2%}), {tog['memory_events']} memory events",
                  flush=True)
            order = [("1", ab_on), ("0", ab_off)]
            if rep % 2:
                order.reverse()
            for every, sink in order:
                res = scaling.orch_once(a.ranks, bind=False, steps=a.steps, warmup=a.warmup, profile_steps=0,
                                        noreduce_steps=0, common=common, extra=["--stats-every", every], tmp=tmp,
                                        tag=f"ab{every}-{rep}", timeout=a.timeout)
                sink.append(res["samples_per_s"])
                step_times.append(res["median_step_time_s"])
                print(f"  rep {rep} --stats-every {every}: {res['samples_per_s']:,.0f} samples/s "
                      f"(load {res['load_before']:.2f})", flush=True)
        micro = micro_cost()
        on = statistics.median(t["on_median_s"] for t in toggles)
        off = statistics.median(t["off_median_s"] for t in toggles)
        in_run = statistics.median(t["on_median_s"] / t["off_median_s"] - 1 for t in toggles)
        in_run_mean = statistics.median(t["on_mean_s"] / t["off_mean_s"] - 1 for t in toggles)
        ab = statistics.median(ab_off) / statistics.median(ab_on) - 1
        step = statistics.median(step_times)
        rows = [
            "| measurement | stats every step | no stats (anchor) | overhead | target < 1 % |",
            "|---|---|---|---|---|",
            (f"| in-run alternation, median step (ms), {a.repeats} jobs | {on * 1e3:.2f} | {off * 1e3:.2f} | "
             f"{in_run:+.2%} (means: {in_run_mean:+.2%}) | {'met' if in_run < 0.01 else 'NOT met'} |"),
            (f"| whole runs alternating, samples/s | {statistics.median(ab_on):,.0f} | "
             f"{statistics.median(ab_off):,.0f} | {ab:+.2%} | {'met' if ab < 0.01 else 'NOT met'} |"),
            (f"| one sample + event encode (micro) | {micro * 1e6:.1f} us | - | {micro / step:+.3%} of a "
             f"{step * 1e3:.1f} ms step | {'met' if micro / step < 0.01 else 'NOT met'} |"),
        ]
        text = "\n".join(rows)
        print()
        print(text)
        if a.markdown:
            command = "python benchmarks/telemetry_overhead.py " + shlex.join(sys.argv[1:])
            with open(a.markdown, "a") as f:
                f.write(f"\n### telemetry overhead, {a.ranks} ranks\n\n`{command}`\n\nmachine: {info.get('cpus')} CPUs "
                        f"({info.get('cpu_model', '?')}), load average at start {info['loadavg'][0]:.2f}, at end "
                        f"{os.getloadavg()[0]:.2f}; elapsed {time.time() - started:.0f} s\n\n{text}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
