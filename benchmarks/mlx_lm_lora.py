"""mlx-lm LoRA fine-tuning: wall time under `orch run` vs `mlx.launch`, same job, alternating.

    python benchmarks/mlx_lm_lora.py [--runs 5] [--ranks 2] [--iters 20] [--form script|command]

The job is unmodified ``mlx_lm.lora`` on the tiny local Llama fixture
(``tests/mlxlm_fixture.py``: no network, no Hub), so the time is mostly what
people pay on every launch: Python and mlx-lm imports, model and tokenizer
load, ring start-up, then a few LoRA iterations. Runs alternate orch /
mlx.launch so both see the same machine load; the medians and the ratio
orch / mlx.launch are printed, plus one JSON line for RESULTS.md.

Every run must really succeed, and every run's adapters must be bit-identical
to the first one's (mlx.launch exits 0 even when ranks fail, so its exit code
alone proves nothing).

``--form script`` (default) runs the console script by its path
(``orch run -n 2 .../bin/mlx_lm.lora -- ARGS``), which orch accepts today;
``--form command`` runs ``orch run -n 2 -- mlx_lm.lora ARGS``, the form
issue 13 adds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, alternate, ratio, result_line, summary, timed  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests import mlxlm_fixture  # noqa: E402


def lora_script() -> str:
    path = Path(sysconfig.get_path("scripts")) / "mlx_lm.lora"
    if not path.is_file():
        sys.exit(f"{path} not found: pip install 'mlx-lm>=0.32'")
    return str(path)


def orch_cmd(form: str, ranks: int, run_dir: Path, args: list[str]) -> list[str]:
    base = [sys.executable, "-m", "orchestrator", "run", "-n", str(ranks), "--run-dir", str(run_dir)]
    if form == "command":
        return [*base, "--", "mlx_lm.lora", *args]
    return [*base, lora_script(), "--", *args]


def mlx_cmd(ranks: int, args: list[str]) -> list[str]:
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        sys.exit("mlx.launch not found on PATH (pip install mlx)")
    return [launcher, "-n", str(ranks), "--", lora_script(), *args]


def lora_run(cmd: list[str], env: dict, cwd: Path, adapters: Path) -> float:
    """Wall time of one run that wrote its adapters and printed no traceback (mlx.launch exits 0 when ranks fail)."""

    def check(r) -> bool | str:
        if not (adapters / "adapters.safetensors").is_file():
            return "no adapters.safetensors"
        return "Traceback" not in r.stderr or "a traceback on stderr"

    return timed(cmd, check=check, what=f"{' '.join(cmd[:6])} ...", env=env, cwd=cwd, timeout=600)


def same_adapters(a: Path, b: Path) -> bool:
    import mlx.core as mx

    x, y = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    return x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]).item() for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each launcher (alternating)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--form", choices=["script", "command"], default="script")
    a = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "ORCH_"))}
    env.update(mlxlm_fixture.OFFLINE_ENV)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="orch-bench-mlxlm-") as tmp:
        tmp_path = Path(tmp)
        fx = mlxlm_fixture.build(tmp_path / "fixture")
        reference = None

        def arm(name: str):
            def one(i: int) -> float:
                nonlocal reference
                out = tmp_path / f"{name}-{i}"
                args = fx.lora_args(out / "adapters", iters=a.iters, batch_size=a.ranks)
                cmd = orch_cmd(a.form, a.ranks, out / "run", args) if name == "orch" else mlx_cmd(a.ranks, args)
                dt = lora_run(cmd, env, tmp_path, out / "adapters")
                if reference is None:
                    reference = out / "adapters"
                elif not same_adapters(reference, out / "adapters"):
                    sys.exit(f"{name} run {i}: adapters differ from the first run's")
                return dt
            return one

        times = alternate({"orch": arm("orch"), "mlx.launch": arm("mlx.launch")}, a.runs, swap=True,
                          progress=lambda i, name, dt, warm: print(f"run {i} {name:10s} {dt:6.2f} s", flush=True))
        med = {k: summary(v).median for k, v in times.items()}
        r = ratio(times["orch"], times["mlx.launch"])
        print(f"median wall time, {a.ranks} ranks, {a.iters} LoRA iterations: orch {med['orch']:.2f} s, "
              f"mlx.launch {med['mlx.launch']:.2f} s; orch / mlx.launch = {r:.2f} (adapters bit-identical)")
        result_line("mlx_lm_lora", ranks=a.ranks, iters=a.iters, runs=a.runs, form=a.form,
                    orch_s=times["orch"], mlx_launch_s=times["mlx.launch"],
                    median_orch_s=med["orch"], median_mlx_launch_s=med["mlx.launch"],
                    ratio=r, ratio_to_min=ratio(times["orch"], times["mlx.launch"], to="min"), cpus=os.cpu_count())


if __name__ == "__main__":
    main()
