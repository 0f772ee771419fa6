"""Weak scaling of data-parallel training: `orch run` + the runtime vs a hand-written `mlx.launch` loop.

    python benchmarks/scaling.py --ranks 1,2,4,8 [--bind] [--steps 50] [--warmup 10] [--repeats 3]

For every N in --ranks and every repeat, in the same run and alternating
which goes first (so both see the same machine load):

* ``orch run benchmarks/bench_mlp.py -n N [--bind]``: the runtime's own loop
  (``Trainer.fit``) on a compute-bound MLP with a fixed per-rank batch; then,
  in the same processes, a profiled phase (``average_gradients`` timed with an
  ``mx.eval`` around it) and a phase with the all-reduce switched off;
* ``mlx.launch -n N --python <this python> benchmarks/mlx_launch_dp_loop.py``:
  the same model, data, optimizer and batch in a hand-written loop.
  ``mlx.launch`` exits 0 even when ranks fail, so every rank's RESULT line is
  checked.

Throughput is measured on the wall clock between the end of step --warmup and
the end of the last step (rank 0; ranks are in lock-step through the
all-reduce), so anything a loop does between steps counts. The table shows
the median over repeats:

    N | orch samples/s | orch eff | grad-avg share | no-allreduce eff | mlx.launch samples/s | mlx eff | orch/mlx

efficiency = throughput(N) / (N x throughput(1)) with throughput(1) of the
same launcher; grad-avg share = time in average_gradients / step time (the
wait for the slowest rank included, unless ``--profile-wait`` times that wait
apart); no-allreduce eff = the efficiency the N
ranks reach when they never communicate (contention for cores, memory
bandwidth and the controller, without communication). The target is orch
efficiency >= 0.9 at 8 ranks; the issue's anchor for a hand-written loop on a
16-core machine is 0.95 / 0.83 / 0.63 at 2 / 4 / 8 ranks.

Gradient dtype on the wire (``--grad-dtypes float32,bfloat16``): the orch arm
runs once per dtype (``bench_mlp --grad-dtype D``, the runtime's own
``gradcomm``), the dtypes alternating which goes first from one (repeat, N)
to the next, and a second table gives, per N and dtype, the efficiency, the
grad-avg share and its milliseconds, and the box's ceiling (the same step in
the same processes with the all-reduce switched off), then the bf16/fp32
ratio of the grad-avg share at the largest N (the target: <= 0.5, i.e.
halved) and whether efficiency reaches ``--target-eff`` where the ceiling
allows it. N=1 never communicates, so its runs of both dtypes are pooled into
the one-rank throughput every efficiency is measured against.

With ``--profile-wait`` the table also gives the *synchronous* ceiling: the
efficiency of steps that each last their slowest rank's own compute plus the
update, with the bytes free. The no-all-reduce ceiling lets every rank run at
its own pace, so it overstates what any synchronous data-parallel step can
reach where ranks compute at different speeds (a noisy VM); the synchronous
one does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_mlp.py"
LOOP = ROOT / "benchmarks" / "mlx_launch_dp_loop.py"
ANCHOR_EFF = {2: 0.95, 4: 0.83, 8: 0.63}
# 'D/variant' arms of --grad-dtypes: extra bench_mlp flags
VARIANT_FLAGS = {"nokeep": ["--no-keep-freed-memory"], "quiet": ["--quiet-wait", "on"], "spin": ["--quiet-wait", "off"], "balance": ["--balance", "speed"]}


class BenchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- launching


def mlx_launch_prefix() -> list[str]:
    exe = shutil.which("mlx.launch")
    if exe:
        return [exe]
    # pip install --target has no console script; mlx's launch module has no __main__.
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def free_port_range(n: int) -> int:
    """A base port with n free consecutive ports (mlx.launch's ring uses base, base+1, ...)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BenchError("no free port range")


def run_measured(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd; returns (result, wall seconds, CPU seconds of the launcher process itself)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         start_new_session=True)
    proc = psutil.Process(p.pid)
    cpu = 0.0
    deadline = time.monotonic() + timeout
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    try:
        # communicate() in small slices so the launcher's own CPU time can be read before it exits
        while True:
            try:
                out, err = p.communicate(timeout=0.25)
                out_chunks.append(out)
                err_chunks.append(err)
                break
            except subprocess.TimeoutExpired:
                try:
                    t = proc.cpu_times()
                    cpu = t.user + t.system
                except psutil.Error:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}")
    finally:
        if p.poll() is None:  # timed out, or we were interrupted: leave no launcher or rank behind
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(1)
            p.wait()
    wall = time.perf_counter() - t0
    r = subprocess.CompletedProcess(cmd, p.returncode, b"".join(out_chunks), b"".join(err_chunks))
    return r, wall, cpu


# ----------------------------------------------------------------------------- one orch run


def orch_once(n: int, *, bind: bool, steps: int, warmup: int, profile_steps: int, noreduce_steps: int,
              common: list[str], extra: list[str], tmp: Path, tag: str, timeout: float) -> dict:
    run_dir = tmp / f"orch-{tag}"
    cmd = [sys.executable, "-m", "orchestrator", "run", str(BENCH), "-n", str(n), "--quiet", "--run-dir", str(run_dir)]
    if bind:
        cmd.append("--bind")
    cmd += ["--", "--steps", str(steps), "--profile-steps", str(profile_steps),
            "--noreduce-steps", str(noreduce_steps), *common, *extra]
    load0 = os.getloadavg()[0]
    r, wall, ctl_cpu = run_measured(cmd, timeout)
    if r.returncode != 0:
        raise BenchError(f"orch exited {r.returncode}: {shlex.join(cmd)}\n{r.stderr.decode()[-2000:]}{r.stdout.decode()[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["status"] != "succeeded" or len(summary["ranks"]) != n:
        raise BenchError(f"orch run not succeeded: {summary.get('reason')}")
    ends: dict[int, float] = {}
    step_times: list[float] = []
    with open(run_dir / "events.jsonl") as f:
        for line in f:
            ev = json.loads(line)
            if ev["kind"] != "step":
                continue
            if ev["rank"] == 0:
                ends[ev["step"]] = ev["t"]
            if ev["step"] > warmup:
                step_times.append(ev["step_time_s"])
    if sorted(ends) != list(range(1, steps + 1)):
        raise BenchError(f"rank 0 emitted steps {sorted(ends)[:3]}..., expected 1..{steps}")
    bench = []
    for rank in range(n):
        lines = [ln for ln in (run_dir / "logs" / f"rank-{rank}.log").read_text().splitlines() if "BENCH_JSON " in ln]
        if len(lines) != 1:
            raise BenchError(f"rank {rank} printed {len(lines)} BENCH_JSON lines (see {run_dir}/logs)")
        bench.append(json.loads(lines[0].split("BENCH_JSON ", 1)[1]))
    per_step = bench[0]["samples_per_step"]
    res = {
        "samples_per_s": per_step * (steps - warmup) / (ends[steps] - ends[warmup]),
        "median_step_time_s": statistics.median(step_times),
        "wall_s": wall,
        "controller_cpu_s": ctl_cpu,
        "load_before": load0,
        "affinity": [b["affinity"] for b in bench],
        "params": bench[0]["params"],
        "rank_cpu_per_wall": statistics.mean(b["fit_cpu_per_wall"] for b in bench),
        "rank_threads": bench[0]["threads"],
    }
    if profile_steps:
        res["allreduce_share"] = statistics.mean(b["profile"]["allreduce_share"] for b in bench)
        res["profile"] = [b["profile"] for b in bench]
        res["allreduce_ms"] = statistics.mean(b["profile"]["allreduce_s"] for b in bench) * 1e3
        res["compute_ms"] = statistics.mean(b["profile"]["compute_s"] for b in bench) * 1e3
        res["compute_ms_max"] = max(b["profile"]["compute_s"] for b in bench) * 1e3
        if all("wait_share" in b["profile"] for b in bench):
            res["wait_share"] = statistics.mean(b["profile"]["wait_share"] for b in bench)
            # The synchronous ceiling: every step waits for its slowest rank's own compute (with
            # --profile-wait the profile's compute excludes the wait), bytes free.
            steps = zip(*[b["profile"]["compute_steps_ms"] for b in bench])
            slowest_s = statistics.median(max(c) for c in steps) / 1e3
            update_s = statistics.median(b["profile"]["update_s"] for b in bench)
            res["sync_ceiling_samples_per_s"] = bench[0]["samples_per_step"] / (slowest_s + update_s)
    if noreduce_steps:
        per_rank = per_step // n
        res["noreduce_samples_per_s"] = sum(per_rank / b["noreduce"]["step_s"] for b in bench)
    return res


# ----------------------------------------------------------------------------- one mlx.launch run


def mlx_once(n: int, *, bind: bool, steps: int, warmup: int, common: list[str], timeout: float) -> dict:
    if n == 1:
        # mlx.launch 0.32.4 -n 1 hands the rank an empty MLX_HOSTFILE, which mx.distributed.init
        # rejects (JSON parse error): one rank runs as plain python, as a user would.
        cmd = [sys.executable, str(LOOP), "--steps", str(steps), *common]
    else:
        cmd = [*mlx_launch_prefix(), "-n", str(n), "-p", str(free_port_range(n)), "--python", sys.executable,
               str(LOOP), "--steps", str(steps), *common]
    if bind:
        cmd.append("--bind")
    load0 = os.getloadavg()[0]
    r, wall, ctl_cpu = run_measured(cmd, timeout)
    results = {}
    for line in r.stdout.decode(errors="replace").splitlines():
        if "RESULT_JSON " in line:
            d = json.loads(line.split("RESULT_JSON ", 1)[1])
            results[d["rank"]] = d
    if r.returncode != 0 or sorted(results) != list(range(n)):
        raise BenchError(f"mlx.launch: rc {r.returncode}, results from ranks {sorted(results)} of {n}: "
                         f"{shlex.join(cmd)}\n{r.stderr.decode()[-2000:]}")
    ends = results[0]["ends"]
    return {
        "samples_per_s": results[0]["samples_per_step"] * (steps - warmup) / (ends[steps - 1] - ends[warmup - 1]),
        "wall_s": wall,
        "controller_cpu_s": ctl_cpu,
        "load_before": load0,
        "affinity": [results[k]["affinity"] for k in range(n)],
        "rank_cpu_per_wall": statistics.mean(results[k]["cpu_per_wall"] for k in range(n)),
    }


# ----------------------------------------------------------------------------- the same loop, no launcher


def bare_once(n: int, *, bind: bool, steps: int, warmup: int, common: list[str], tmp: Path, timeout: float) -> dict:
    """The hand-written loop started by plain subprocess.Popen with the ring environment, no launcher.

    Separates what a launcher costs from what the runtime costs: mlx.launch
    0.32.4's I/O threads select() on each rank's always-writable stdin pipe
    with a zero timeout, so its launcher process spins a whole core.
    """
    env = dict(os.environ)
    if n > 1:
        base = free_port_range(n)
        hostfile = tmp / f"bare-hosts-{n}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{base + i}"] for i in range(n)]))
        env["MLX_HOSTFILE"] = str(hostfile)
    cmd = [sys.executable, str(LOOP), "--steps", str(steps), *common] + (["--bind"] if bind else [])
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "MLX_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) for r in range(n)]
    results, errors = {}, []
    try:
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            for line in out.decode(errors="replace").splitlines():
                if "RESULT_JSON " in line:
                    d = json.loads(line.split("RESULT_JSON ", 1)[1])
                    results[d["rank"]] = d
            if p.returncode != 0:
                errors.append(f"rank {r} exited {p.returncode}: {err.decode()[-500:]}")
    except subprocess.TimeoutExpired:
        errors.append("timed out")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if errors or sorted(results) != list(range(n)):
        raise BenchError(f"bare launch: {errors}, results from ranks {sorted(results)} of {n}")
    ends = results[0]["ends"]
    return {
        "samples_per_s": results[0]["samples_per_step"] * (steps - warmup) / (ends[steps - 1] - ends[warmup - 1]),
        "wall_s": time.perf_counter() - t0,
        "load_before": load0,
        "rank_cpu_per_wall": statistics.mean(results[k]["cpu_per_wall"] for k in range(n)),
    }


# ----------------------------------------------------------------------------- compute-only contention


def contention(specs: str, steps: int, common: list[str], timeout: float) -> str:
    """K independent single-process bench_mlp runs (no group, no launcher), each pinned to C CPUs.

    ``specs`` is a list like "1x16,8x2,16x1" (K processes x C CPUs). Shows what
    N ranks lose to sharing the machine alone, rank by rank, with no
    communication and no launcher: the ceiling for any data-parallel efficiency.
    """
    cpus = sorted(os.sched_getaffinity(0))
    lines = ["| processes x CPUs each | per-process compute ms (median of profiled steps) | mean | vs 1 process |",
             "|---|---|---|---|"]
    base = None
    for spec in specs.split(","):
        k, c = (int(v) for v in spec.lower().split("x"))
        tmp = Path(tempfile.mkdtemp(prefix="orch-contention-"))
        procs = []
        for i in range(k):
            mine = cpus[i * c:(i + 1) * c] or [cpus[i % len(cpus)]]
            pin = f"import os,runpy,sys; os.sched_setaffinity(0,{mine}); sys.argv=sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
            cmd = [sys.executable, "-c", pin, str(BENCH), "--steps", "5", "--profile-steps", str(steps), *common]
            env = {k2: v for k2, v in os.environ.items() if k2 not in ("MLX_HOSTFILE", "MLX_RANK")}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            (tmp / str(i)).mkdir()
            procs.append(subprocess.Popen(cmd, cwd=tmp / str(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        comp = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            line = next((ln for ln in out.decode().splitlines() if "BENCH_JSON " in ln), None)
            if p.returncode != 0 or line is None:
                raise BenchError(f"contention run failed: {err.decode()[-1000:]}")
            comp.append(json.loads(line.split("BENCH_JSON ", 1)[1])["profile"]["compute_s"] * 1e3)
        shutil.rmtree(tmp, ignore_errors=True)
        mean = statistics.mean(comp)
        if base is None:
            base = mean
        lines.append(f"| {k} x {c} | {' '.join(f'{x:.1f}' for x in comp)} | {mean:.1f} | {mean / base:.2f}x |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def machine_info() -> dict:
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        import mlx.core as mx

        info["mlx"] = mx.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        sib = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
        if sib.exists():
            info["cpu0_thread_siblings"] = sib.read_text().strip()
    except OSError:
        pass
    info["loadavg"] = os.getloadavg()
    return info


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: dict[int, dict], ranks: list[int], baseline: bool, bare: bool = False) -> str:
    t1_orch = med(rows[1]["orch"].get("samples_per_s", [])) if 1 in rows else None
    t1_mlx = med(rows[1]["mlx"].get("samples_per_s", [])) if 1 in rows and baseline else None
    head = ("| N | orch samples/s | orch eff | grad-avg share | no-allreduce eff | "
            "mlx.launch samples/s | mlx.launch eff | orch/mlx.launch | anchor eff | orch ctl CPU % |")
    t1_bare = med(rows[1]["bare"].get("samples_per_s", [])) if bare and 1 in rows else None
    if bare:
        head += " bare-Popen loop samples/s | bare eff | orch/bare |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in ranks:
        o = rows[n]["orch"]
        ot = med(o.get("samples_per_s", []))
        oeff = ot / (n * t1_orch) if ot and t1_orch else None
        share = med(o.get("allreduce_share", []))
        nr = med(o.get("noreduce_samples_per_s", []))
        nreff = nr / (n * t1_orch) if nr and t1_orch else None
        ctl = med([c / w * 100 for c, w in zip(o.get("controller_cpu_s", []), o.get("wall_s", []))])
        if baseline:
            m = rows[n]["mlx"]
            mt = med(m.get("samples_per_s", []))
            meff = mt / (n * t1_mlx) if mt and t1_mlx else None
            ratio = ot / mt if ot and mt else None
        else:
            mt = meff = ratio = None
        lines.append(
            f"| {n} | {fmt(ot, ',.0f')} | {fmt(oeff, '.3f')} | {fmt(share, '.1%')} | {fmt(nreff, '.3f')} | "
            f"{fmt(mt, ',.0f')} | {fmt(meff, '.3f')} | {fmt(ratio, '.3f')} | {ANCHOR_EFF.get(n, '-') if n > 1 else '1'} | "
            f"{fmt(ctl, '.1f')} |"
        )
        if bare:
            bt = med(rows[n]["bare"].get("samples_per_s", []))
            beff = bt / (n * t1_bare) if bt and t1_bare else None
            lines[-1] += f" {fmt(bt, ',.0f')} | {fmt(beff, '.3f')} | {fmt(ot / bt if ot and bt else None, '.3f')} |"
    return "\n".join(lines)


def dtype_table(rows: dict[int, dict], ranks: list[int], dtypes: list[str], target_eff: float) -> str:
    """Per N and wire dtype: efficiency, grad-avg share and ms, and the no-all-reduce ceiling; then the verdicts."""
    one = [x for d in dtypes for x in rows[1].get(f"orch:{d}", {}).get("samples_per_s", [])] if 1 in rows else []
    t1 = med(one)
    head = ("| N | grad dtype | orch samples/s | eff | grad-avg share | grad-avg ms | compute ms (mean / slowest rank) "
            "| ceiling: no-allreduce eff | eff / ceiling | wait share (--profile-wait) "
            "| sync ceiling (slowest rank's compute, bytes free) | runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    stats: dict[tuple[int, str], dict] = {}
    for n in ranks:
        for d in dtypes:
            o = rows[n].get(f"orch:{d}", {})
            ot = med(o.get("samples_per_s", []))
            eff = ot / (n * t1) if ot and t1 else None
            nr = med(o.get("noreduce_samples_per_s", []))
            ceil = nr / (n * t1) if nr and t1 else None
            sc = med(o.get("sync_ceiling_samples_per_s", []))
            sync = sc / (n * t1) if sc and t1 else None
            share = med(o.get("allreduce_share", []))
            wait = med(o.get("wait_share", []))
            stats[n, d] = {"eff": eff, "ceil": ceil, "share": share, "wait": wait, "sync": sync}
            lines.append(
                f"| {n} | {d} | {fmt(ot, ',.0f')} | {fmt(eff, '.3f')} | {fmt(share, '.1%')} | "
                f"{fmt(med(o.get('allreduce_ms', [])), '.2f')} | {fmt(med(o.get('compute_ms', [])), '.1f')} / "
                f"{fmt(med(o.get('compute_ms_max', [])), '.1f')} | {fmt(ceil, '.3f')} | "
                f"{fmt(eff / ceil if eff and ceil else None, '.3f')} | {fmt(wait, '.1%')} | {fmt(sync, '.3f')} | "
                f"{len(o.get('samples_per_s', []))} |")
    lines.append("")
    top = max(ranks)
    if top > 1 and len(dtypes) >= 2:
        a, b = dtypes[0], dtypes[1]
        sa, sb = stats[top, a]["share"], stats[top, b]["share"]
        lines.append(f"At N={top}: grad-avg share {b}/{a} = {fmt(sb / sa if sa and sb else None, '.2f')} "
                     f"({fmt(sb, '.1%')} / {fmt(sa, '.1%')}; target <= 0.50, halved).")
    for n in ranks:
        if n == 1:
            continue
        for d in dtypes:
            st = stats[n, d]
            if st["eff"] is None or st["ceil"] is None:
                continue
            if st["ceil"] < target_eff:
                verdict = f"ceiling {st['ceil']:.3f} < {target_eff}: the box does not allow the target"
            elif st["eff"] >= target_eff:
                verdict = "met"
            elif st["sync"] is not None and st["sync"] < target_eff:
                verdict = (f"not met; the synchronous ceiling {st['sync']:.3f} < {target_eff}: each step waits for "
                           "its slowest rank's own compute, bytes or not")
            else:
                verdict = "not met"
            lines.append(f"N={n} {d}: efficiency {st['eff']:.3f} vs target {target_eff} -> {verdict}.")
    return "\n".join(lines)


def exit_on_sigterm() -> None:
    """`timeout` sends SIGTERM: unwind (so run_measured stops the launch in flight) instead of dying."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


# ----------------------------------------------------------------------------- raw all_sum, float32 vs bfloat16


def wire_rank(argv: list[str]) -> None:
    """Rank side of --wire: raw ``all_sum`` of float32 and bfloat16 buffers of the same element count.

    No trainer, no cast, no packing: whether halving the bytes halves the
    collective at all on this machine's links. Each timing starts after a
    barrier; the dtypes alternate which goes first. Rank 0 prints WIRE_JSON.
    """
    import mlx.core as mx

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="0.57,12.6,27.4")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(argv)
    g = mx.distributed.init()

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=g))

    out = {}
    for mib in (float(x) for x in a.sizes_mib.split(",")):
        n = int(mib * 2**20 / 4)
        bufs = {"float32": mx.ones((n,), dtype=mx.float32), "bfloat16": mx.ones((n,), dtype=mx.bfloat16)}
        mx.eval(list(bufs.values()))
        times: dict[str, list[float]] = {d: [] for d in bufs}
        cast = []
        for it in range(a.iters + 1):
            for d in (("float32", "bfloat16") if it % 2 == 0 else ("bfloat16", "float32")):
                barrier()
                t0 = time.perf_counter()
                y = mx.distributed.all_sum(bufs[d], group=g)
                mx.eval(y)
                if it:
                    times[d].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mx.eval(bufs["float32"].astype(mx.bfloat16).astype(mx.float32))
            if it:
                cast.append(time.perf_counter() - t0)
        assert float(y[0].item()) == g.size(), "wrong all_sum"
        out[str(mib)] = {d: statistics.median(v) for d, v in times.items()} | {"cast_s": statistics.median(cast)}
    if g.rank() == 0:
        print("WIRE_JSON " + json.dumps({"size": g.size(), "seconds": out}), flush=True)


def wire(ranks: list[int], sizes: str, iters: int, timeout: float) -> str:
    """Driver of --wire: ``orch run benchmarks/scaling.py -n N -- --wire-rank ...`` for each N; one table."""
    lines = ["| N | buffer (float32 MiB) | float32 all_sum ms | bfloat16 all_sum ms | float32/bfloat16 | "
             "cast f32->bf16->f32 ms (local) |", "|---|---|---|---|---|---|"]
    for n in ranks:
        run_dir = Path(tempfile.mkdtemp(prefix="orch-wire-")) / "run"
        cmd = [sys.executable, "-m", "orchestrator", "run", str(Path(__file__).resolve()), "-n", str(n), "--quiet",
               "--run-dir", str(run_dir), "--", "--wire-rank", "--sizes-mib", sizes, "--iters", str(iters)]
        r, wall, _ = run_measured(cmd, timeout)
        log = (run_dir / "logs" / "rank-0.log")
        found = [ln for ln in (log.read_text().splitlines() if log.exists() else []) if "WIRE_JSON " in ln]
        if r.returncode != 0 or not found:
            lines.append(f"| {n} | failed (exit {r.returncode}) | {r.stderr.decode()[-200:]!r} | | | |")
            continue
        res = json.loads(found[0].split("WIRE_JSON ", 1)[1])
        for mib, v in res["seconds"].items():
            f, b = v["float32"] * 1e3, v["bfloat16"] * 1e3
            lines.append(f"| {n} | {mib} | {f:.2f} | {b:.2f} | {f / b:.2f}x | {v['cast_s'] * 1e3:.2f} |")
        print(lines[-1], flush=True)
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--wire-rank"]:
        wire_rank(sys.argv[2:])
        return
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="1,2,4,8", help="comma-separated rank counts (1 is added: efficiency needs it)")
    ap.add_argument("--bind", action=argparse.BooleanOptionalAction, default=False,
                    help="orch run --bind, and the same pinning in the mlx.launch loop")
    ap.add_argument("--steps", type=int, default=50, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=10, help="steps discarded at the start of each run")
    ap.add_argument("--profile-steps", type=int, default=15, help="profiled steps (grad-avg share) after the timed ones")
    ap.add_argument("--profile-wait", action="store_true",
                    help="profiled steps put a barrier before the all-reduce: the grad-avg share then counts only "
                         "moving the bytes, and the wait for the slowest rank gets its own column")
    ap.add_argument("--noreduce-steps", type=int, default=15, help="steps without all-reduce after the profiled ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-args", default="", help="recipe flags given to both loops, e.g. '--hidden 256 --batch-size 128'")
    ap.add_argument("--orch-args", default="", help="extra bench_mlp flags for orch only, e.g. '--all-reduce-size 0'")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the mlx.launch loop")
    ap.add_argument("--grad-dtypes", default="",
                    help="e.g. 'float32,bfloat16': one orch arm per gradient dtype on the wire (--grad-dtype), "
                         "alternating, and the dtype table; 'D/nokeep' adds an arm with --no-keep-freed-memory "
                         "(glibc returns freed buffers to the kernel, as before runtime/allocator.py), 'D/quiet' and 'D/spin' "
                         "with --quiet-wait on / off (ranks of a machine wait for its slowest asleep / spinning in the "
                         "collective), 'D/balance' "
                         "with --balance speed; variants combine with '+', e.g. 'float32/quiet+balance'")
    ap.add_argument("--target-eff", type=float, default=0.92, help="efficiency target the dtype table checks")
    ap.add_argument("--bare", action="store_true",
                    help="also run the hand-written loop started by bare Popen (no launcher process)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per launch")
    ap.add_argument("--json", help="write all raw measurements here")
    ap.add_argument("--markdown", help="append the table (with the command and machine) to this file")
    ap.add_argument("--label", default="", help="a title for the markdown section")
    ap.add_argument("--contention", metavar="KxC,...",
                    help="instead of the sweep: K independent unlaunched bench_mlp processes pinned to C CPUs each")
    ap.add_argument("--wire", action="store_true",
                    help="instead of the sweep: raw all_sum of float32 vs bfloat16 buffers under orch run -n N")
    ap.add_argument("--sizes-mib", default="0.57,12.6,27.4", help="buffer sizes for --wire (float32 MiB)")
    a = ap.parse_args()
    if a.wire:
        text = wire(sorted({int(x) for x in a.ranks.split(",")} - {1}), a.sizes_mib, a.profile_steps, a.timeout)
        print(text)
        if a.markdown:
            with open(a.markdown, "a") as f:
                f.write(f"\n### {a.label or 'raw all_sum, float32 vs bfloat16'}\n\n`python benchmarks/scaling.py "
                        f"{shlex.join(sys.argv[1:])}`\n\n{text}\n")
        return
    if a.contention:
        text = contention(a.contention, a.profile_steps, shlex.split(a.model_args), a.timeout)
        if a.markdown:
            with open(a.markdown, "a") as f:
                f.write(f"\n### {a.label or 'compute-only contention'}\n\n`python benchmarks/scaling.py "
                        f"{shlex.join(sys.argv[1:])}`\n\n{text}\n")
        return
    if a.warmup < 1 or a.steps <= a.warmup:
        sys.exit("need 1 <= --warmup < --steps")

    ranks = sorted({1, *(int(x) for x in a.ranks.split(","))})
    common, extra = shlex.split(a.model_args), shlex.split(a.orch_args)
    if a.profile_wait:
        extra.append("--profile-wait")
    info = machine_info()
    print(f"# machine: {info}", flush=True)
    dtypes = [d for d in a.grad_dtypes.split(",") if d]
    orch_arms = [f"orch:{d}" for d in dtypes] or ["orch"]
    rows: dict[int, dict] = {n: {**{w: {} for w in orch_arms}, "mlx": {}, "bare": {}} for n in ranks}

    tmp = Path(tempfile.mkdtemp(prefix="orch-scaling-"))
    started = time.time()
    failures: list[str] = []

    def one(rep: int, n: int, which: str) -> None:
        if which.startswith("orch"):
            dt, _, variant = which.partition(":")[2].partition("/")  # e.g. "bfloat16/nokeep"
            flags = (["--grad-dtype", dt] if dt else []) + [f for v in variant.split("+") if v for f in VARIANT_FLAGS[v]]
            res = orch_once(n, bind=a.bind, steps=a.steps, warmup=a.warmup, profile_steps=a.profile_steps,
                            noreduce_steps=a.noreduce_steps, common=common, extra=extra + flags, tmp=tmp,
                            tag=f"n{n}-r{rep}-{(dt or 'default') + (variant and '-' + variant)}", timeout=a.timeout)
            note = (f"share {res.get('allreduce_share', 0):.1%}  noreduce {res.get('noreduce_samples_per_s', 0):,.0f}  "
                    f"ctl cpu {res['controller_cpu_s']:.2f}s/{res['wall_s']:.1f}s  threads {res['rank_threads']}")
        elif which == "mlx":
            res = mlx_once(n, bind=a.bind, steps=a.steps, warmup=a.warmup, common=common, timeout=a.timeout)
            note = f"ctl cpu {res['controller_cpu_s']:.2f}s/{res['wall_s']:.1f}s"
        else:
            res = bare_once(n, bind=a.bind, steps=a.steps, warmup=a.warmup, common=common, tmp=tmp, timeout=a.timeout)
            note = ""
        for k, v in res.items():
            rows[n][which].setdefault(k, []).append(v)
        print(f"  rep {rep} N={n} {which:<13} {res['samples_per_s']:>10,.0f} samples/s  {note}  "
              f"rank cpu/wall {res['rank_cpu_per_wall']:.2f}  load {res['load_before']:.2f}", flush=True)

    try:
        for rep in range(a.repeats):
            for i, n in enumerate(ranks):
                arms = orch_arms if i % 2 == 0 else orch_arms[::-1]  # dtypes alternate who goes first (with rep % 2 below)
                order = arms + (["mlx"] if a.baseline else []) + (["bare"] if a.bare else [])
                if rep % 2:  # alternate who goes first, so drifting load hits both alike
                    order.reverse()
                for which in order:
                    try:
                        one(rep, n, which)
                    except BenchError as e:  # keep going: one failed launch must not lose the sweep
                        failures.append(f"N={n} rep {rep} {which}: {e}")
                        print(f"  FAILED N={n} rep {rep} {which}: {e}", flush=True)
    except SystemExit:  # SIGTERM, e.g. from `timeout`: report what was measured
        failures.append("interrupted: later runs are missing")
        print("  INTERRUPTED; reporting what was measured", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if dtypes:
        text = dtype_table(rows, ranks, dtypes, a.target_eff)
    else:
        text = table(rows, ranks, a.baseline, a.bare)
    print()
    print(text)
    for n in ranks:
        t1 = med(rows[1]["mlx"].get("samples_per_s", []))
        tn = med(rows[n]["mlx"].get("samples_per_s", []))
        if n in ANCHOR_EFF and a.baseline and t1 and tn:
            eff = tn / (n * t1)
            print(f"N={n}: hand-written loop efficiency here {eff:.3f} vs the issue's anchor {ANCHOR_EFF[n]} "
                  f"(ratio {eff / ANCHOR_EFF[n]:.2f})")
    command = "python benchmarks/scaling.py " + shlex.join(sys.argv[1:])
    if a.json:
        Path(a.json).write_text(json.dumps({"command": command, "machine": info, "rows": rows, "failures": failures,
                                            "elapsed_s": time.time() - started}, indent=1))
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write(f"\n### {a.label or 'scaling'}\n\n`{command}`\n\n"
                    f"machine: {info.get('cpus')} CPUs ({info.get('cpu_model', '?')}), cpu0 siblings "
                    f"{info.get('cpu0_thread_siblings', '?')}, MLX {info.get('mlx', '?')}, Python {info['python']}, "
                    f"load average at start {info['loadavg'][0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
                    f"{a.repeats} repeats, medians; elapsed {time.time() - started:.0f} s\n\n{text}\n"
                    + "".join(f"\nFAILED {x[:300]}\n" for x in failures))

if __name__ == "__main__":
    main()
