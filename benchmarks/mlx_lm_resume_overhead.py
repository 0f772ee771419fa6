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
also measured directly, in this process, on the very arrays and state an "on"
run saved (median of 20): what one save costs the training thread (the
safetensors bytes made in memory), what its writer thread then spends on the
files, fsyncs and rename (off the training thread, unless the next save comes
first), and the bookkeeping (numpy's state read where an epoch opens), as a
fraction of ``--save-every`` iterations of the "off" runs' median loop.

Every run must succeed and end with adapters bit-identical to the first run's
(the saving must not change training). One JSON line for RESULTS.md at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import alternate, result_line, timed_run  # noqa: E402

from benchmarks.mlx_lm_lora import same_adapters  # noqa: E402
from tests import mlxlm_fixture  # noqa: E402


def loop_seconds(run_dir: Path) -> float:
    """Rank 0's first to last training report, as orch received them."""
    t = [e["recv_t"] for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
         if e.get("kind") == "step"]
    return t[-1] - t[0]


def one_run(on: bool, out: Path, fx, a, env: dict) -> tuple[float, float, int]:
    """(wall seconds, loop seconds, orch checkpoints kept) of one run that succeeded and saved as expected."""
    args = fx.lora_args(out / "adapters", iters=a.iters, batch_size=a.ranks)
    i = args.index("--steps-per-report")
    args[i + 1] = str(a.report_every)
    cmd = [sys.executable, "-m", "orchestrator", "run", "-n", str(a.ranks), "--run-dir", str(out / "run"),
           *([] if on else ["--env", "ORCH_MLX_LM_RESUME=0"]), "-m", "mlx_lm", "--", "lora", *args,
           "--save-every", str(a.save_every)]
    ckpts = out / "run" / "checkpoints"

    def check(_run) -> bool | str:
        if not (out / "adapters" / "adapters.safetensors").is_file():
            return "no adapters written"
        saved = len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) if ckpts.is_dir() else 0
        return True if on == (saved > 0) else f"{saved} orch checkpoints (expected {'some' if on else 'none'})"

    r = timed_run(cmd, check=check, what=f"orch run ({'on' if on else 'off'})", cwd=out.parent, env=env, timeout=900)
    saved = len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) if ckpts.is_dir() else 0
    return r.seconds, loop_seconds(out / "run"), saved


def direct_cost(saved_run: Path, tmp: Path, per_epoch: int, repeats: int = 20) -> tuple[float, float, float, int]:
    """Measured here, on the arrays and state an "on" run saved: (seconds of one save on the training thread,
    seconds of its write + fsyncs + rename on the writer thread, seconds of bookkeeping per iteration (numpy's
    state read and compared where an epoch of ``per_epoch`` batches opens), bytes)."""
    import io

    import mlx.core as mx
    import numpy as np

    from orchestrator.integrations.mlx_lm_resume import _np_state_to_json, _same_np_state, _Session
    from orchestrator.runtime import checkpoint

    cp = checkpoint.latest_complete(saved_run / "checkpoints")
    weights, opt = checkpoint.load(cp)
    mx.eval(weights, opt)
    writer = _Session.__new__(_Session)  # only what _commit reads
    writer.root, writer._umask, writer._failed = tmp / "direct", checkpoint._umask(), None
    on_thread, committing = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        state = dict(cp.state, step=1000 + i)
        state["mlx_lm"] = dict(state["mlx_lm"], numpy_rng=_np_state_to_json(np.random.get_state()))
        blobs = {}
        for name, arrays in ((checkpoint.MODEL_FILE, weights), (checkpoint.OPTIMIZER_FILE, opt)):
            buf = io.BytesIO()
            mx.save_safetensors(buf, arrays)
            blobs[name] = buf.getvalue()
        t1 = time.perf_counter()
        writer._commit(1000 + i, blobs, state)
        t2 = time.perf_counter()
        assert writer._failed is None, writer._failed
        on_thread.append(t1 - t0)
        committing.append(t2 - t1)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        before = np.random.get_state()
        _same_np_state(before, np.random.get_state())
    per_iter = (time.perf_counter() - t0) / n / per_epoch
    size = sum((cp.path / f).stat().st_size for f in cp.state["files"]) + (cp.path / "state.json").stat().st_size
    return statistics.median(on_thread), statistics.median(committing), per_iter, size


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
        loop: dict[str, list[float]] = {"on": [], "off": []}
        reference: list[Path] = []

        def arm(name: str):
            def measure(i: int) -> float:
                out = tmp_path / f"{name}-{i}"
                dt, lt, saved = one_run(name == "on", out, fx, a, env)
                loop[name].append(lt)
                if not reference:
                    reference.append(out / "adapters")
                elif not same_adapters(reference[0], out / "adapters"):
                    sys.exit(f"{name} run {i}: adapters differ from the first run's")
                print(f"run {i} {name:3s} wall {dt:6.2f} s  loop {lt:6.3f} s  orch checkpoints kept {saved}", flush=True)
                return dt
            return measure

        wall = alternate({"on": arm("on"), "off": arm("off")}, a.runs, swap=True)
        med_w = {k: statistics.median(v) for k, v in wall.items()}
        med_l = {k: statistics.median(v) for k, v in loop.items()}
        rw, rl = med_w["on"] / med_w["off"], med_l["on"] / med_l["off"]
        print(f"median, {a.ranks} ranks, {a.iters} iterations, --save-every {a.save_every}: wall on {med_w['on']:.2f} s, "
              f"off {med_w['off']:.2f} s, on / off = {rw:.3f}; loop on {med_l['on']:.3f} s, off {med_l['off']:.3f} s, "
              f"on / off = {rl:.3f} (adapters bit-identical in every run)")
        examples = len((fx.data / "train.jsonl").read_text().splitlines())
        per_epoch = len(range(0, examples - a.ranks + 1, a.ranks))  # mlx-lm's batches per epoch (batch size = ranks)
        save_s, commit_s, book_s, size = direct_cost(tmp_path / "on-0" / "run", tmp_path, per_epoch)
        reported = a.iters - a.report_every  # the loop time spans rank 0's first to last report
        iter_s = med_l["off"] / reported
        direct = (save_s + a.save_every * book_s) / (a.save_every * iter_s)
        blocking = (save_s + commit_s + a.save_every * book_s) / (a.save_every * iter_s)
        print(f"direct: one save {save_s * 1e3:.2f} ms on the training thread + {commit_s * 1e3:.2f} ms write/fsync/"
              f"rename on its own thread ({size / 1024:.0f} KiB), bookkeeping {book_s * 1e6:.2f} us per iteration, "
              f"an iteration {iter_s * 1e3:.2f} ms (off runs' median loop): the saving adds {direct * 100:.2f} % to "
              f"every {a.save_every} iterations ({blocking * 100:.2f} % if the training thread also waited for the disk)")
        result_line("mlx_lm_resume_overhead", **{"ranks": a.ranks, "iters": a.iters, "save_every": a.save_every, "runs": a.runs,
                                       "wall_on_s": wall["on"], "wall_off_s": wall["off"], "loop_on_s": loop["on"],
                                       "loop_off_s": loop["off"], "wall_ratio": rw, "loop_ratio": rl,
                                       "save_s": save_s, "commit_s": commit_s, "blocking_fraction": blocking, "bookkeeping_s_per_iter": book_s, "save_bytes": size,
                                       "iter_s": iter_s, "direct_fraction": direct,
                                       "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
