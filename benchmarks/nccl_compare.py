"""orch vs mlx.launch on MLX's NCCL backend (CUDA GPUs), in the same run: contract, correctness, bandwidth, a recipe.

    python benchmarks/nccl_compare.py -n 2 [--sizes-mib 1,16,64,256] [--iters 10] [--repeats 2] [--recipe-steps 100]

For each repeat, alternating which launcher goes first:

* ``orch run benchmarks/nccl_allsum.py -n N --backend nccl``;
* ``mlx.launch -n N --backend nccl --nccl-port P benchmarks/nccl_allsum.py``
  (``mlx.launch`` exits 0 even when ranks fail, so its ranks' lines are checked).

Both run the same rank script (``nccl_allsum.py``): each rank reports the
environment its launcher handed it, checks ``all_sum`` in three dtypes, and
rank 0 reports all_sum timings. The contract check compares what the ranks
saw under both launchers (``MLX_WORLD_SIZE``, ``NCCL_HOST_IP``,
``CUDA_VISIBLE_DEVICES`` per rank; ports differ by design, both free). Then
once, ``orch run recipes/mlp_regression.py -n N --backend nccl`` trains the
runtime's smallest recipe on the GPUs. Prints one table (median over
repeats) and ``NCCL_COMPARE_JSON {...}``. A launch that fails is reported with
its exit code and the launcher's last lines, and the rest still runs: on a
machine with fewer GPUs than N, that failure is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = ROOT / "benchmarks" / "nccl_allsum.py"
RECIPE = ROOT / "recipes" / "mlp_regression.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines_with(text: str, tag: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if tag in line:
            out.append(json.loads(line.split(tag, 1)[1]))
    return out


def run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """(exit code, stdout+stderr, wall seconds); on a timeout, exit code 124 and the whole process group killed.

    The launcher runs in its own session, so a rank stuck in NCCL's bootstrap
    (waiting for a peer that never comes) goes down with it.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out.decode(errors="replace"), time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        out, _ = p.communicate()
        return 124, out.decode(errors="replace") + f"\n[timed out after {timeout:.0f}s]", time.perf_counter() - t0


def orch_once(n: int, args: list[str], tmp: Path, tag: str, timeout: float) -> dict:
    run_dir = tmp / f"orch-{tag}"
    cmd = [sys.executable, "-m", "orchestrator", "run", str(RANK_SCRIPT), "-n", str(n), "--backend", "nccl",
           "--quiet", "--run-dir", str(run_dir), "--", *args]
    rc, out, wall = run(cmd, timeout)
    logs = "".join((run_dir / "logs" / f"rank-{r}.log").read_text(errors="replace")
                   for r in range(n) if (run_dir / "logs" / f"rank-{r}.log").exists())
    res = {"launcher": "orch", "rc": rc, "wall_s": wall, "ranks": lines_with(logs, "NCCL_RANK "),
           "result": (lines_with(logs, "NCCL_JSON ") or [None])[0], "tail": out[-1500:]}
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        res["summary"] = {k: s.get(k) for k in ("status", "reason", "diagnosis", "backend", "world_size")}
    return res


def mlx_once(n: int, args: list[str], timeout: float) -> dict:
    launch = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
    cmd = [*launch, "--backend", "nccl", "-n", str(n), "--nccl-port", str(free_port()), "--python", sys.executable,
           str(RANK_SCRIPT), "--", *args]
    rc, out, wall = run(cmd, timeout)
    return {"launcher": "mlx.launch", "rc": rc, "wall_s": wall, "ranks": lines_with(out, "NCCL_RANK "),
            "result": (lines_with(out, "NCCL_JSON ") or [None])[0], "tail": out[-1500:]}


def ok(res: dict, n: int) -> bool:
    return res["rc"] == 0 and res["result"] is not None and len(res["ranks"]) == n


def contract(res: dict) -> dict[int, dict]:
    keys = ("MLX_WORLD_SIZE", "NCCL_HOST_IP", "CUDA_VISIBLE_DEVICES")
    return {r["rank"]: {k: r["env"].get(k) for k in keys} | {"device": r["device"]} for r in res["ranks"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--sizes-mib", default="1,16,64,256")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--recipe-steps", type=int, default=100, help="0: skip the recipe run")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per launch")
    ap.add_argument("--json", help="write everything measured here")
    a = ap.parse_args()
    rank_args = ["--sizes-mib", a.sizes_mib, "--iters", str(a.iters)]
    tmp = Path(tempfile.mkdtemp(prefix="orch-nccl-"))
    runs: list[dict] = []
    for rep in range(a.repeats):
        order = ["orch", "mlx.launch"] if rep % 2 == 0 else ["mlx.launch", "orch"]
        for which in order:
            res = orch_once(a.n, rank_args, tmp, f"r{rep}", a.timeout) if which == "orch" \
                else mlx_once(a.n, rank_args, a.timeout)
            res["repeat"] = rep
            runs.append(res)
            if ok(res, a.n):
                sizes = res["result"]["sizes"]
                big = max(sizes, key=int)
                print(f"  rep {rep} {which:<10} ok  all_sum {big} MiB {sizes[big]['ms']:.3f} ms "
                      f"busbw {sizes[big]['busbw_GBps'] or 0:.1f} GB/s  wall {res['wall_s']:.1f}s", flush=True)
            else:
                print(f"  rep {rep} {which:<10} FAILED rc={res['rc']}  ranks reporting {len(res['ranks'])}/{a.n}\n"
                      + "\n".join("      " + ln for ln in res["tail"].splitlines()[-25:]), flush=True)

    recipe = None
    if a.recipe_steps:
        run_dir = tmp / "recipe"
        cmd = [sys.executable, "-m", "orchestrator", "run", str(RECIPE), "-n", str(a.n), "--backend", "nccl",
               "--quiet", "--run-dir", str(run_dir), "--", "--steps", str(a.recipe_steps)]
        rc, out, wall = run(cmd, a.timeout)
        recipe = {"command": shlex.join(cmd[1:]), "rc": rc, "wall_s": wall, "tail": out[-1500:]}
        if (run_dir / "summary.json").exists():
            s = json.loads((run_dir / "summary.json").read_text())
            recipe |= {"status": s.get("status"), "reason": s.get("reason"),
                       "last_loss": [r.get("last_loss") for r in s.get("ranks", [])],
                       "steps": [r.get("steps") for r in s.get("ranks", [])],
                       "mlx_peak_bytes": [(r.get("memory") or {}).get("mlx_peak_bytes") for r in s.get("ranks", [])]}
        print(f"  recipe: rc={rc} status={recipe.get('status')} steps={recipe.get('steps')} "
              f"last loss={recipe.get('last_loss')} mlx peak={recipe.get('mlx_peak_bytes')} wall {wall:.1f}s", flush=True)
        if rc != 0:
            print("\n".join("      " + ln for ln in out.splitlines()[-25:]), flush=True)

    good = {w: [r for r in runs if r["launcher"] == w and ok(r, a.n)] for w in ("orch", "mlx.launch")}
    print()
    print(f"| all_sum size (float32) | orch ms | orch bus GB/s | mlx.launch ms | mlx.launch bus GB/s | orch/mlx.launch time |")
    print("|---|---|---|---|---|---|")
    sizes = [s for s in a.sizes_mib.split(",") if s]
    for s in sizes:
        o = statistics.median([r["result"]["sizes"][s]["ms"] for r in good["orch"]]) if good["orch"] else None
        m = statistics.median([r["result"]["sizes"][s]["ms"] for r in good["mlx.launch"]]) if good["mlx.launch"] else None
        bus = lambda ms: (2 * (a.n - 1) / a.n * int(s) * 2**20 / (ms / 1e3) / 1e9) if ms and a.n > 1 else None  # noqa: E731
        f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        print(f"| {s} MiB | {f(o, '.3f')} | {f(bus(o), '.1f')} | {f(m, '.3f')} | {f(bus(m), '.1f')} | "
              f"{f(o / m if o and m else None, '.3f')} |")
    c_orch = contract(good["orch"][0]) if good["orch"] else None
    c_mlx = contract(good["mlx.launch"][0]) if good["mlx.launch"] else None
    print(f"\nper-rank contract, orch:       {c_orch}\nper-rank contract, mlx.launch: {c_mlx}")
    if c_orch and c_mlx:
        print("contract identical (ports aside):", c_orch == c_mlx)
    print(f"runs ok: orch {len(good['orch'])}/{a.repeats}, mlx.launch {len(good['mlx.launch'])}/{a.repeats}")
    payload = {"n": a.n, "runs": runs, "recipe": recipe, "contract": {"orch": c_orch, "mlx.launch": c_mlx}}
    print("NCCL_COMPARE_JSON " + json.dumps({"n": a.n, "ok": {k: len(v) for k, v in good.items()},
                                             "contract_equal": c_orch == c_mlx if c_orch and c_mlx else None,
                                             "recipe_status": recipe and recipe.get("status")}), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
