"""``orch env``: what a bug report needs about every host, in one paste (like ``python -m torch.utils.collect_env``).

For each host: the OS (and on macOS its version and build), Python, MLX and orch versions,
the Metal memory limits, Thunderbolt links with their speeds and the Mac at the far end,
and the RDMA state (``rdma_ctl status``, ``ibv_devices``, the Thunderbolt Bridge's members).
Built from the same probe and parsers as ``orch check`` (``probe_host.py``,
``jaccl_checks.read_macos``), so what ``orch env`` shows is what ``orch check`` judged.
Without ``--hostfile`` it describes this machine only.

Exit status: 0 every host answered, 1 some host did not (its row says why), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Optional

from orchestrator import __version__
from orchestrator.health.check import CheckOptions, close_runners, connect_runners, probe_hosts, ssh_options
from orchestrator.health.verdicts import HostResult
from orchestrator.remote import add_ssh_arguments
from orchestrator.units import human_bytes

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def host_env(name: str, local: bool, rep: Optional[dict], problem: Optional[str] = None) -> dict[str, Any]:
    """One host's probe report -> the fields ``orch env`` prints (pure: tested with recorded macOS outputs)."""
    out: dict[str, Any] = {"host": name, "local": local}
    if rep is None:
        out["error"] = problem or "no report"
        return out
    mlx = rep.get("mlx") or {}
    out.update(system=rep.get("system"), machine=rep.get("machine"), platform=rep.get("platform"),
               hostname=rep.get("hostname"), python=rep.get("python"), python_version=rep.get("python_version"),
               mlx=mlx.get("version"), mlx_error=mlx.get("error"), orch=rep.get("orch"))
    mem = rep.get("memory") or {}
    out["memory"] = {"total": mem.get("total"), "available": mem.get("available")}
    if rep.get("system") == "Darwin":
        metal = rep.get("metal") or {}
        out["metal"] = dict(metal)
        try:
            from orchestrator.probe.macos import parse_metal_device_info

            m = parse_metal_device_info(metal)
            out["metal"].update(memory_size=m.memory_size, max_recommended_working_set_size=m.max_recommended_working_set_size)
        except (ValueError, SyntaxError) as e:
            out["metal"]["error"] = metal.get("error") or str(e)
        if rep.get("macos") is not None:
            from orchestrator.health.jaccl_checks import read_macos

            out["macos"] = read_macos(rep["macos"]).as_json()
    return out


def _line(label: str, value: str) -> str:
    return f"  {label + ':':<13}{value}"


def render_env(hosts: list[dict]) -> str:
    lines = [f"orch env: orch {__version__} on the controller, {len(hosts)} host{'s' if len(hosts) != 1 else ''}"]
    for h in hosts:
        lines += ["", f"{h['host']}" + (" (this machine)" if h.get("local") else "")]
        if "error" in h:
            lines.append(_line("error", h["error"]))
            continue
        lines.append(_line("OS", f"{h.get('platform') or h.get('system')} ({h.get('machine')})"))
        mac = h.get("macos")
        if mac is not None:
            lines.append(_line("macOS", f"{mac['macos']} ({mac['build']})" if mac.get("macos") else
                               mac["errors"].get("macos", "unknown")))
        lines.append(_line("Python", f"{h.get('python_version')} ({h.get('python')})"))
        lines.append(_line("MLX", h.get("mlx") or f"not importable: {h.get('mlx_error')}"))
        lines.append(_line("orch", h.get("orch") or "not installed for this python"))
        mem = h.get("memory") or {}
        if mem.get("total"):
            lines.append(_line("memory", f"{human_bytes(mem.get('available'))} available of {human_bytes(mem['total'])}"))
        metal = h.get("metal")
        if metal is not None:
            lines.append(_line("Metal", f"working set limit {human_bytes(metal['max_recommended_working_set_size'])}"
                               + (f" of {human_bytes(metal['memory_size'])}" if metal.get("memory_size") else "")
                               if metal.get("max_recommended_working_set_size") else metal.get("error", "unknown")))
        if mac is not None:
            err = mac["errors"]
            tb = mac.get("thunderbolt")
            if tb is None:
                lines.append(_line("Thunderbolt", err.get("thunderbolt", "unknown")))
            else:
                cabled = [l for l in tb if l["peer"]]
                text = "; ".join(f"{l['iface'] or '?'} (port {l['receptacle']}) {l['speed']}"
                                 + (f" {l['generation']}" if l["generation"] else f" [{l['error']}]")
                                 + f" -> {l['peer']}" for l in cabled)
                lines.append(_line("Thunderbolt", text or f"{len(tb)} ports, no Mac cabled"))
            rdma = "rdma_ctl " + (mac["rdma_ctl"] or err.get("rdma_ctl", "unknown"))
            devs = mac.get("ibv_devices")
            rdma += "; ibv_devices: " + ((", ".join(devs) or "none") if devs is not None else err.get("ibv_devices", "?"))
            lines.append(_line("RDMA", rdma))
            if mac.get("bridge"):
                members = mac.get("bridge_members")
                lines.append(_line("bridge", f"{mac['bridge']} members: " + (", ".join(members) or "none")
                                   if members is not None else err.get("bridge", "unknown")))
    return "\n".join(lines) + "\n"


async def collect_env(opts: CheckOptions, err=None) -> list[dict]:
    """Probe every host of the hostfile (or this machine) with the macOS facts on; ConfigError for bad input."""
    from orchestrator.hostfile import ConfigError, load_hostfile, local_hostfile

    if opts.timeout <= 0:
        raise ConfigError(f"--timeout {opts.timeout:g}: must be positive")
    hostfile = load_hostfile(opts.hostfile) if opts.hostfile else local_hostfile(1)
    hosts = [HostResult(i, h.name, h.is_local) for i, h in enumerate(hostfile.hosts)]
    conns: dict = {}
    runners: dict = {}
    try:
        conns, runners = await connect_runners(hostfile, opts, hosts, err or sys.stderr)
        reports = await probe_hosts(hostfile, hosts, runners, conns, opts, backend=None, macos=True)
    finally:
        await close_runners(conns, runners)
    out = []
    for i, h in enumerate(hosts):
        failed = next((c.detail for c in h.checks.values() if c.status == "fail"), None)
        out.append(host_env(h.host, h.local, reports.get(i), failed))
    return out


def add_env_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--hostfile", help="JSON hostfile: describe every host in it (default: this machine only)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.add_argument("--python", help="python interpreter to describe (default: the hostfile's, python3 remotely)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds each host may take (default 20)")
    add_ssh_arguments(p, connect_timeout=False)  # --timeout bounds the connect too
    return p


def cmd_env(args: argparse.Namespace) -> int:
    from orchestrator.hostfile import ConfigError

    opts = CheckOptions(hostfile=args.hostfile, python=args.python, json_output=args.json, ssh=ssh_options(args),
                        timeout=args.timeout)
    try:
        hosts = asyncio.run(collect_env(opts))
    except ConfigError as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    if opts.json_output:
        sys.stdout.write(json.dumps({"orch": __version__, "hosts": hosts}, indent=2) + "\n")
    else:
        sys.stdout.write(render_env(hosts))
    sys.stdout.flush()
    return EXIT_OK if all("error" not in h for h in hosts) else EXIT_FAIL


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orch env", description="Describe every host for a bug report.")
    add_env_arguments(parser)
    return cmd_env(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
