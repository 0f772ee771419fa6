"""How irregular are step intervals? The measurement behind the cadence watchdog's K.

    python benchmarks/step_jitter.py [--load 2] [--repeat 2]

The cadence rule (orchestrator/watchdog.py) fires when no step came for
max(--hang-floor, K x the slowest interval seen so far). A healthy run must never
trip it, so K must exceed the worst "surprise" a real run shows: an interval
divided by the slowest interval before it (outside phases). This runs real jobs
under `orch run -n 2` — the mlp recipe, the char-level LM recipe with evaluation
and checkpoints, and unmodified `mlx_lm.lora` on the tiny local fixture (rows every
iteration) — each with and without `--load` busy processes competing for the cores,
reads every rank's step events from events.jsonl, and prints per job: the number of
intervals, the median and slowest, the worst surprise (from the third interval on:
the first ones include compilation; only once the slowest before is >= 0.1 s, since
shorter ones are covered 300x by the 30 s floor, and the controller receives rows in
bursts), and whether any interval passed 10x the slowest before it without the floor. One JSON line at the end for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import mlxlm_fixture  # noqa: E402

K = 10.0


def _burn(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def intervals(run_dir: Path) -> dict[int, list[float]]:
    """Per rank, the intervals between its steps; an interval spanning any rank's phase is left out."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    last: dict[int, float] = {}
    spanned: set[int] = set()
    ranks = {e.get("from_rank") for e in events}
    out: dict[int, list[float]] = {}
    for e in events:
        rank, kind, t = e.get("from_rank"), e.get("kind"), e.get("recv_t")
        if kind == "phase_start":
            spanned |= ranks
        elif kind == "step" and t is not None:
            if rank in last and rank not in spanned:
                out.setdefault(rank, []).append(t - last[rank])
            last[rank] = t
            spanned.discard(rank)
    return out


BASE_S = 0.1  # below this the 30 s floor is a margin of 300x: such intervals say nothing about K


def surprise(series: list[float]) -> tuple[float, bool]:
    """The worst interval / slowest-before-it from the third interval on (once the slowest before is at
    least BASE_S), and whether any passed K x."""
    worst, tripped = 0.0, False
    for i in range(2, len(series)):
        before = max(series[:i])
        if before >= BASE_S:
            worst = max(worst, series[i] / before)
            tripped = tripped or series[i] > K * before
    return worst, tripped


def jobs(fx) -> dict[str, list[str]]:
    return {
        "char_lm (eval, checkpoints)": [str(ROOT / "recipes" / "char_lm.py"), "--", "--steps", "60",
                                        "--eval-every", "20", "--checkpoint-every", "20"],
        "char_lm, 4x batch": [str(ROOT / "recipes" / "char_lm.py"), "--", "--steps", "30", "--batch-size", "128"],
        "mlx_lm.lora (rows every 5 its)": ["-m", "mlx_lm", "--", "lora",
                                           *fx.lora_args("ADAPTERS", iters=60, batch_size=2), "--steps-per-report", "5"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=2, help="busy processes in the loaded runs (default 2: one per core here)")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fx = mlxlm_fixture.build(tmp / "fixture")
        env = {**os.environ, **mlxlm_fixture.OFFLINE_ENV}
        for name, argv in jobs(fx).items():
            for load in (0, a.load):
                for rep in range(a.repeat):
                    rd = tmp / f"run-{len(results)}"
                    cmd = [sys.executable, "-m", "orchestrator", "run", "-n", "2", "--run-dir", str(rd), "--quiet",
                           *[x.replace("ADAPTERS", str(rd / "adapters")) for x in argv]]
                    stop = multiprocessing.Event()
                    burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(load)]
                    for b in burners:
                        b.start()
                    try:
                        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
                    finally:
                        stop.set()
                        for b in burners:
                            b.join(timeout=10)
                    if p.returncode != 0:
                        print(f"{name}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    for rank, series in sorted(intervals(rd).items()):
                        worst, tripped = surprise(series)
                        row = {"job": name, "load": load, "rep": rep, "rank": rank, "intervals": len(series),
                               "median_s": round(statistics.median(series), 4), "slowest_s": round(max(series), 4),
                               "worst_surprise": round(worst, 2), "past_10x": tripped}
                        results.append(row)
                        print(f"{name:38s} load {load} rep {rep} rank {rank}: {len(series):4d} intervals, median "
                              f"{row['median_s'] * 1000:7.1f} ms, slowest {row['slowest_s'] * 1000:7.1f} ms, worst "
                              f"surprise {worst:5.2f}x{'  PAST 10x' if tripped else ''}")
    worst = max(r["worst_surprise"] for r in results) or float("nan")
    print(f"worst surprise over all runs: {worst:.2f}x; K = {K:g} leaves a margin of {K / worst:.1f}x")
    print(json.dumps({"bench": "step_jitter", "worst_surprise": worst, "k": K,
                      "any_past_k": any(r["past_10x"] for r in results), "rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
