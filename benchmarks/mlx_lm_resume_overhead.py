"""What orch's exact mlx-lm restarts cost: the same LoRA run with and without the extra state saving, alternating.

    python benchmarks/mlx_lm_resume_overhead.py [--runs 5] [--ranks 2] [--iters 160] [--save-every 40]

Unmodified ``mlx_lm.lora`` under ``orch run`` on the tiny local Llama fixture
(``tests/mlxlm_fixture.py``), with ``--save-every``: mlx-lm writes its adapter
files either way; "on" is orch's default (at each of those saves rank 0 also
writes a complete checkpoint: adapters, optimizer state, RNG and data
position, fsynced and renamed), "off" is the same run with
``--env ORCH_MLX_LM_RESUME=0``. Runs alternate on/off so both see the same
machine load. Two ratios on / off, medians:

* the run's wall time (``orch run`` start to exit): the target is < 1.05;
* the training loop alone (rank 0's first to last reported iteration, from
  events.jsonl): the stricter view, since start-up (imports, model load, ring)
  is most of a run this small.

On a shared, loaded machine both swing by more than the effect, so the cost is
also measured directly, in this process: one save (``checkpoint.save`` of the
very arrays and state an "on" run saved, fsyncs included, median of 20) and
the per-iteration bookkeeping (numpy's RNG state read and compared), as a
fraction of ``--save-every`` iterations of the "off" runs' median loop.

Every run must succeed and end with adapters bit-identical to the first run's
(the saving must not change training). One JSON line for RESULTS.md at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.mlx_lm_lora import same_adapters  # noqa: E402
from tests import mlxlm_fixture  # noqa: E402


def loop_seconds(run_dir: Path) -> float:
    """Rank 0's first to last training report, as orch received them."""
    t = [e["recv_t"] for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
         if e.get("kind") == "step"]
    return t[-1] - t[0]


def one_run(on: bool, out: Path, fx, a, env: dict) -> tuple[float, float, int]:
    args = fx.lora_args(out / "adapters", iters=a.iters, batch_size=a.ranks)
    i = args.index("--steps-per-report")
    args[i + 1] = str(a.report_every)
    cmd = [sys.executable, "-m", "orchestrator", "run", "-n", str(a.ranks), "--run-dir", str(out / "run"),
           *([] if on else ["--env", "ORCH_MLX_LM_RESUME=0"]), "-m", "mlx_lm", "--", "lora", *args,
           "--save-every", str(a.save_every)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or not (out / "adapters" / "adapters.safetensors").is_file():
        sys.exit(f"run {'on' if on else 'off'} failed (rc {r.returncode}):\n{r.stderr[-1500:]}")
    ckpts = out / "run" / "checkpoints"
    saved = len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) if ckpts.is_dir() else 0
    if on != (saved > 0):
        sys.exit(f"run {'on' if on else 'off'}: {saved} orch checkpoints (expected {'some' if on else 'none'})")
    return dt, loop_seconds(out / "run"), saved


def direct_cost(saved_run: Path, tmp: Path, repeats: int = 20) -> tuple[float, float, int]:
    """(seconds per save, seconds of bookkeeping per iteration, bytes per save), measured here."""
    import mlx.core as mx
    import numpy as np

    from orchestrator.integrations.mlx_lm_resume import _np_state_to_json, _same_np_state
    from orchestrator.runtime import checkpoint

    cp = checkpoint.latest_complete(saved_run / "checkpoints")
    weights, opt = checkpoint.load(cp)
    meta = {k: v for k, v in cp.state.items() if k not in ("format", "step", "files", "run_id")}
    mx.eval(weights, opt)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        meta["mlx_lm"]["numpy_rng"] = _np_state_to_json(np.random.get_state())
        checkpoint.save(tmp / "direct", 1000 + i, weights, opt, meta, keep=2)
        times.append(time.perf_counter() - t0)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        before = np.random.get_state()
        _same_np_state(before, np.random.get_state())
    per_iter = (time.perf_counter() - t0) / n
    size = sum((cp.path / f).stat().st_size for f in cp.state["files"]) + (cp.path / "state.json").stat().st_size
    return statistics.median(times), per_iter, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each arm (alternating)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=160)
    ap.add_argument("--save-every", type=int, default=40)
    ap.add_argument("--report-every", type=int, default=10, help="mlx-lm's --steps-per-report")
    a = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "ORCH_"))}
    env.update(mlxlm_fixture.OFFLINE_ENV)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="orch-bench-mlxlm-resume-") as tmp:
        tmp_path = Path(tmp)
        fx = mlxlm_fixture.build(tmp_path / "fixture")
        wall: dict[str, list[float]] = {"on": [], "off": []}
        loop: dict[str, list[float]] = {"on": [], "off": []}
        reference = None
        for i in range(a.runs):
            for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                out = tmp_path / f"{name}-{i}"
                dt, lt, saved = one_run(name == "on", out, fx, a, env)
                wall[name].append(dt)
                loop[name].append(lt)
                if reference is None:
                    reference = out / "adapters"
                elif not same_adapters(reference, out / "adapters"):
                    sys.exit(f"{name} run {i}: adapters differ from the first run's")
                print(f"run {i} {name:3s} wall {dt:6.2f} s  loop {lt:6.3f} s  orch checkpoints kept {saved}", flush=True)
        med_w = {k: statistics.median(v) for k, v in wall.items()}
        med_l = {k: statistics.median(v) for k, v in loop.items()}
        rw, rl = med_w["on"] / med_w["off"], med_l["on"] / med_l["off"]
        print(f"median, {a.ranks} ranks, {a.iters} iterations, --save-every {a.save_every}: wall on {med_w['on']:.2f} s, "
              f"off {med_w['off']:.2f} s, on / off = {rw:.3f}; loop on {med_l['on']:.3f} s, off {med_l['off']:.3f} s, "
              f"on / off = {rl:.3f} (adapters bit-identical in every run)")
        save_s, book_s, size = direct_cost(tmp_path / "on-0" / "run", tmp_path)
        reported = a.iters - a.report_every  # the loop time spans rank 0's first to last report
        iter_s = med_l["off"] / reported
        direct = (save_s + a.save_every * book_s) / (a.save_every * iter_s)
        print(f"direct: one save {save_s * 1e3:.2f} ms ({size / 1024:.0f} KiB), bookkeeping {book_s * 1e6:.1f} us per "
              f"iteration, an iteration {iter_s * 1e3:.2f} ms (off runs' median loop): the saving adds "
              f"{direct * 100:.2f} % to every {a.save_every} iterations")
        print("RESULT " + json.dumps({"ranks": a.ranks, "iters": a.iters, "save_every": a.save_every, "runs": a.runs,
                                       "wall_on_s": wall["on"], "wall_off_s": wall["off"], "loop_on_s": loop["on"],
                                       "loop_off_s": loop["off"], "wall_ratio": rw, "loop_ratio": rl,
                                       "save_s": save_s, "bookkeeping_s_per_iter": book_s, "save_bytes": size,
                                       "iter_s": iter_s, "direct_fraction": direct,
                                       "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
