"""Per-host checks from one host probe's report: python, MLX (and agreement across hosts), Metal, disk,
memory, clock, Open MPI. Pure functions of the report, so they are tested with recorded reports."""

from __future__ import annotations

from typing import Any, Optional

from orchestrator import backends
from orchestrator.probe import probes
from orchestrator.health.verdicts import HostResult
from orchestrator.remote import REMOTE_BASE
from orchestrator.units import human_bytes

DISK_WARN_BYTES = 2 << 30
SKEW_WARN_S = 1.0
STAGING_DIR = f"~/{REMOTE_BASE}"


def host_checks(h: HostResult, rep: dict, samples: list[tuple[float, float, float]], *, backend: str,
                mpi_local: Optional[Any], mpi_error: Optional[str], mpi_prefix: Optional[str],
                python: Optional[str] = None) -> None:
    """Turn one host probe's report into checks (MLX version agreement is decided later, across hosts)."""
    exe = rep.get("python")
    h.add("python", "pass", (f"{python} -> " if python and python != exe else "") + f"{exe} (Python "
          f"{rep.get('python_version')}, {rep.get('system')} {rep.get('machine')})", f"{rep.get('python_version')}")
    mlx = rep.get("mlx") or {}
    if mlx.get("version"):
        h.add("mlx", "pass", f"mlx {mlx['version']}", mlx["version"])
    else:
        err = mlx.get("error") or "not importable"
        h.add("mlx", "fail", f"MLX is not importable with {rep.get('python')}: {err} "
              f"(pip install mlx into that interpreter, or point \"python\"/--python at one that has it)", "not importable")
    if rep.get("system") == "Darwin" and mlx.get("version"):
        metal = rep.get("metal") or {}
        try:
            from orchestrator.probe.macos import parse_metal_device_info

            mem = parse_metal_device_info(metal)
            h.add("metal", "pass", f"Metal working set limit {human_bytes(mem.max_recommended_working_set_size)}"
                  f" of {human_bytes(mem.memory_size)}", human_bytes(mem.max_recommended_working_set_size))
        except (ValueError, SyntaxError) as e:
            h.add("metal", "warn", f"no Metal device info: {metal.get('error') or e}", "unknown")
    disk = rep.get("disk") or {}
    if "free" in disk:
        free = disk["free"]
        status = "warn" if free < DISK_WARN_BYTES else "pass"
        h.add("disk", status, f"{human_bytes(free)} free at {disk.get('path')} (staging dir {STAGING_DIR})"
              + ("; under 2 GiB: staging and checkpoints may not fit" if status == "warn" else ""),
              f"{human_bytes(free)} free")
    else:
        h.add("disk", "warn", f"free space unknown: {disk.get('error')}", "unknown")
    mem = rep.get("memory") or {}
    if mem.get("total"):
        h.add("memory", "pass", f"{human_bytes(mem.get('available'))} available of {human_bytes(mem['total'])}",
              f"{human_bytes(mem.get('available'))}/{human_bytes(mem['total'])}")
    else:
        h.add("memory", "warn", f"memory unknown: {mem.get('error') or 'not reported'}", "unknown")
    if backend and backends.get(backend).started_by_mpirun:
        mpi_check(h, rep.get("mpi") or {}, mpi_local, mpi_error, mpi_prefix)
    if h.local:
        h.add("clock", "pass", "this machine's clock", "local")
    else:
        est = probes.clock_offset(samples)
        if est is None:
            h.add("clock", "warn", "no clock sample", "unknown")
        else:
            off, rtt = est
            status = "warn" if abs(off) > SKEW_WARN_S else "pass"
            h.add("clock", status, f"offset {off:+.3f} s from this machine (±{rtt / 2 * 1000:.1f} ms)"
                  + ("; over 1 s: timestamps in logs and events will not line up" if status == "warn" else ""),
                  f"{off:+.3f}s")


def mpi_check(h: HostResult, rep: dict, mpi_local, mpi_error: Optional[str], mpi_prefix: Optional[str]) -> None:
    if mpi_error:
        h.add("mpi", "fail", f"mpirun runs on this machine and it has no usable Open MPI: {mpi_error}", "none here")
        return
    if h.local:
        h.add("mpi", "pass", f"{mpi_local.version} ({mpi_local.mpirun})", mpi_local.version.split()[-1] if mpi_local.version else "ok")
        return
    path, text = rep.get("path"), rep.get("version") or ""
    if not path:
        where = f"{mpi_prefix}/bin/mpirun, PATH" if mpi_prefix else "PATH"
        h.add("mpi", "fail", f"no Open MPI found (searched {where}); mpirun starts its daemons there with --prefix "
              f"{mpi_prefix or '?'}: install Open MPI at the same path as on this machine", "not found")
    elif "Open MPI" not in text and "OpenRTE" not in text:
        h.add("mpi", "fail", f"{path} is not Open MPI ({text.splitlines()[0] if text else 'no version'}); MLX loads Open MPI only",
              "not Open MPI")
    elif mpi_prefix and not path.startswith(mpi_prefix.rstrip("/") + "/"):
        h.add("mpi", "fail", f"Open MPI is at {path}, but mpirun passes --prefix {mpi_prefix} (this machine's); "
              "install it at the same path on every host", "other path")
    else:
        h.add("mpi", "pass", f"{text.splitlines()[0]} ({path})", text.splitlines()[0].split()[-1])


def mlx_agreement(hosts: list[HostResult], versions: dict[int, str]) -> None:
    """Every host must run the same MLX: the hosts in the minority fail, naming every version and where."""
    by_version: dict[str, list[str]] = {}
    for i, v in versions.items():
        names = by_version.setdefault(v, [])
        if hosts[i].host not in names:
            names.append(hosts[i].host)
    if len(by_version) < 2:
        return
    counts = sorted(((len({i for i, v2 in versions.items() if v2 == v}), v) for v in by_version), reverse=True)
    majority = counts[0][1] if counts[0][0] > counts[1][0] else None
    listing = "; ".join(f"{v} on {', '.join(names)}" for v, names in by_version.items())
    for i, v in versions.items():
        if majority is not None and v == majority:
            continue
        h = hosts[i]
        if majority is not None:
            detail = (f"mlx {v} here, but {majority} on {', '.join(by_version[majority])}: every host needs the same MLX "
                      f"(versions: {listing})")
        else:
            detail = f"MLX versions differ and no version has a majority: {listing}; install one version everywhere"
        h.add("mlx", "fail", detail, f"{v} ≠ {majority}" if majority else f"{v} (differs)")

