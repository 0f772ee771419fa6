"""``orch check --collective``: a real all_sum across every rank through ``orch run``'s own machinery
(``orchestrator/runtime/probe_collective.py``): result checked, algorithm and bus bandwidth, latency."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from orchestrator.units import human_bytes

if TYPE_CHECKING:
    from orchestrator.health.options import CheckOptions
    from orchestrator.hostfile import Hostfile

PROBE_COLLECTIVE = Path(__file__).resolve().parent.parent / "runtime" / "probe_collective.py"


async def run_collective(opts: CheckOptions, hostfile: Hostfile, backend: str, err) -> dict:
    """A real all_sum over every rank, started exactly like ``orch run`` starts a job."""
    from orchestrator.hostfile import ConfigError
    from orchestrator.run import RunRequest, run_job_async

    tmp = Path(tempfile.mkdtemp(prefix="orch-check-"))
    run_dir = tmp / "run"
    budget = max(60.0, 4 * opts.timeout)
    req = RunRequest(
        script=str(PROBE_COLLECTIVE), script_args=["--size-mib", f"{opts.collective_mib:g}"],
        hostfile=opts.hostfile, n=opts.n if not opts.hostfile else None, backend=backend, python=opts.python,
        run_dir=str(run_dir), init_timeout=max(opts.timeout, 10.0), first_step_timeout=budget, hang_timeout=budget, hang_floor=budget,
        starting_port=opts.starting_port, echo=False, json_output=True, silent=True,
        ssh_config=opts.ssh.ssh_config, known_hosts=opts.ssh.known_hosts, identity=list(opts.ssh.identity),
        ssh_accept_new=opts.ssh.accept_new, connect_timeout=opts.ssh.connect_timeout, mpirun=opts.mpirun)
    try:
        summary = await asyncio.wait_for(run_job_async(req), budget + 60)
    except asyncio.TimeoutError:
        return {"ok": False, "detail": f"the all_sum run did not finish within {budget + 60:g}s; logs in {run_dir}",
                "run_dir": str(run_dir)}
    except ConfigError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"ok": False, "detail": f"could not start the all_sum run: {e}"}
    m = summary.metrics or {}
    if summary.status != "succeeded" or not m.get("allsum_correct"):
        why = summary.diagnosis or summary.reason or ("wrong all_sum result" if m else "no result reported")
        return {"ok": False, "detail": f"all_sum across {summary.world_size} ranks failed: {why}; logs in {run_dir}",
                "run_dir": str(run_dir), "metrics": m}
    detail = (f"{human_bytes(m['allsum_bytes'])} all_sum over {m['world_size']} ranks: result correct; "
              f"{m['algbw_GBps']:.3g} GB/s algorithm bandwidth ({m['busbw_GBps']:.3g} GB/s bus), "
              f"median {m['allsum_s'] * 1000:.1f} ms; 8-byte all_sum latency median {m['latency_us']:.0f} µs "
              f"(of {m['latency_iters']})")
    note = expected_speed_note(hostfile, m.get("busbw_GBps"))
    shutil.rmtree(tmp, ignore_errors=True)  # kept only when it failed: then its logs say why
    return {"ok": True, "detail": detail + (f"; {note}" if note else ""), **{k: m[k] for k in (
        "world_size", "allsum_bytes", "allsum_s", "algbw_GBps", "busbw_GBps", "latency_us", "latency_iters")},
        "expected": note}


def expected_speed_note(hostfile: Hostfile, busbw_gbps: Optional[float]) -> Optional[str]:
    """Thunderbolt cables (hostfile ``links``) carry 40 Gb/s (TB3/4) or 80 Gb/s (TB5); a note, never a failure."""
    if not any(h.links for h in hostfile.hosts) or busbw_gbps is None:
        return None
    pct = busbw_gbps * 8 / 40 * 100
    return (f"the hostfile's links are Thunderbolt cables: 40 Gb/s (TB3/TB4, 5 GB/s) or 80 Gb/s (TB5, 10 GB/s) each; "
            f"bus bandwidth is {pct:.0f}% of 40 Gb/s (IP over Thunderbolt usually reaches a fraction of the line rate)")

