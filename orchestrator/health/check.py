"""``orch check``: is this cluster ready for a run? Every host and every ring link, in parallel.

What is checked (each with a bound on its time; see ``probes.py`` for what runs on a host):

* **ssh**: reachable and authenticated (the launcher's own connector, so ssh_config,
  known_hosts, identities, user/port and ``--ssh-accept-new`` behave exactly as in
  ``orch run``), the host key status, the round trip over the channel.
* **python / mlx / mpi / metal**: the interpreter the run will use (``--python``, the
  hostfile's ``python``, else ``python3`` over SSH and this interpreter locally) starts;
  MLX imports, and its version is the same everywhere (hosts in the minority fail, every
  version is named); Open MPI where ``--backend mpi`` needs it; on macOS the Metal
  working-set limit.
* **disk / memory / clock**: free space under ``~/.cache/mlx-orch`` (warning under 2 GiB),
  memory, clock offset against this machine (half the round trip corrected; warning above 1 s).
* **links**: for every ring edge rank i -> rank i+1, a listener on rank i+1's host at the
  exact ``ip:port`` of the plan, and a connection to it *from rank i's host*: wrong-side
  addresses, downed links, ports in use, an address that is not the host's, and routes
  through the wrong interface are named per link.
* **jaccl** (``--backend jaccl|jaccl-ring``, or a hostfile whose backend is, or whose ``rdma``
  matrix makes, jaccl*): per host macOS >= 26.2 with one build everywhere, RDMA enabled
  (``rdma_ctl status``), the hostfile's ``rdma_*`` devices present (``ibv_devices``), a
  Thunderbolt 5 link behind each, and no Thunderbolt Bridge holding those ports
  (``jaccl_checks.py``).
* **collective** (``--collective``): a real all_sum across all ranks through ``orch run``'s
  own machinery (``orchestrator/runtime/probe_collective.py``): result checked, algorithm and
  bus bandwidth, small-message latency.

Exit status: 0 all pass (warnings allowed), 1 something failed, 2 a bad hostfile or option.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from orchestrator import backends
from orchestrator.probe import probes
from orchestrator.health.collective import run_collective
from orchestrator.health.jaccl_checks import build_agreement, device_names, jaccl_host_checks
from orchestrator.health.hosts import STAGING_DIR, host_checks, mlx_agreement
from orchestrator.health.links import check_links, ring_edges
from orchestrator.health.options import CheckOptions
from orchestrator.health.verdicts import HostResult, Report, render
from orchestrator.probe.runner import REMOTE_PYTHON, ProbeFailed, Runner, read_report
from orchestrator.remote import add_ssh_arguments

if TYPE_CHECKING:  # importing this module stays cheap (``orch --help`` builds its parser): pydantic loads on use
    from orchestrator.hostfile import Hostfile
    from orchestrator.remote.ssh import SSHOptions

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
CLOCK_SAMPLES = 3


# ----------------------------------------------------------------------------- the check


def _python_for(opts: CheckOptions, host) -> str:
    if opts.python or host.python:
        return opts.python or host.python
    return sys.executable if host.is_local else REMOTE_PYTHON


def _load(opts: CheckOptions) -> Hostfile:
    from orchestrator.hostfile import ConfigError, load_hostfile, local_hostfile

    if opts.hostfile and opts.n is not None:
        raise ConfigError("give either -n N (local ranks) or --hostfile FILE, not both")
    if opts.hostfile:
        return load_hostfile(opts.hostfile)
    if opts.n is not None:
        return local_hostfile(opts.n)
    raise ConfigError("orch check needs --hostfile FILE (or -n N for this machine)")


async def run_check(opts: CheckOptions, err=None) -> Report:
    """Everything ``orch check`` does; ConfigError for a bad hostfile or option (nothing is contacted then)."""
    from orchestrator.hostfile import ConfigError
    from orchestrator.plan import plan_job

    err = err or sys.stderr
    t0 = time.monotonic()
    if opts.timeout <= 0:
        raise ConfigError(f"--timeout {opts.timeout:g}: must be positive")
    hostfile = _load(opts)
    plan = plan_job(hostfile, opts.backend, 1, opts.starting_port)  # as orch run: asked for, the hostfile's, or chosen
    backend = plan.backend
    hosts = [HostResult(i, h.name, h.is_local) for i, h in enumerate(hostfile.hosts)]
    names = [h.name for h in hostfile.hosts]
    report = Report(backend=backend, world_size=plan.world_size, hosts=hosts)

    mpi_local = mpi_error = mpi_prefix = None
    kind = backends.get(backend)
    if kind.started_by_mpirun:
        from orchestrator.launch.mpi import find_mpi

        try:
            mpi_local = find_mpi(opts.mpirun)
            mpi_prefix = str(Path(mpi_local.libdir).parent) if mpi_local.libdir else None
        except ConfigError as e:
            mpi_error = str(e)

    conns: dict = {}
    runners: dict[int, Runner] = {}
    try:
        conns, runners = await connect_runners(hostfile, opts, hosts, err)
        reports = await probe_hosts(hostfile, hosts, runners, conns, opts, backend, mpi_local, mpi_error, mpi_prefix)
        versions = {i: r["mlx"]["version"] for i, r in reports.items() if (r.get("mlx") or {}).get("version")}
        mlx_agreement(hosts, versions)
        if kind.rdma:
            builds = {}
            for i, rep in reports.items():
                facts = jaccl_host_checks(hosts[i], rep, device_names(hostfile.hosts[i].rdma))
                if facts is not None and facts.build:
                    builds[i] = facts.build
            build_agreement(hosts, builds)
        edges = ring_edges(hostfile, plan)
        if edges:
            report.links = await check_links(edges, names, hosts, runners, reports, opts)
        if opts.link_bandwidth:
            report.link_bandwidth = await link_bandwidth(hostfile, runners, reports, opts, backend)
    finally:
        await close_runners(conns, runners)
    if opts.collective:
        if not all(h.ok for h in hosts) or not all(l.ok for l in report.links):
            report.collective = {"ok": False, "detail": "not run: fix the failures above first (a broken ring only hangs)"}
        else:
            report.collective = await run_collective(opts, hostfile, backend, err)
    report.seconds = time.monotonic() - t0
    return report


async def link_bandwidth(hostfile: Hostfile, runners: dict, reports: dict, opts: CheckOptions, backend: str) -> dict:
    """``--link-bandwidth``: every link between the hosts measured (``linkbw.py``), and the fastest ring beside the
    hostfile's (``ringorder.py``). Informational: it never fails the check, a path that failed is named in it."""
    from orchestrator.probe.linkbw import measure_links, needs_measuring
    from orchestrator.plan.ringorder import NoRingError, choose_ring

    if not backends.get(backend).ring:
        return {"detail": f"not measured: the {backend} backend has no ring order to choose"}
    why_not = needs_measuring(hostfile)
    usable = {i: r for i, r in runners.items() if i in reports}  # the link probe needs a python that started
    matrix = await measure_links(hostfile, usable, timeout=opts.timeout, connect_timeout=opts.connect_timeout)
    out: dict = {"matrix": matrix.model_dump(mode="json")}
    if why_not:
        out["detail"] = f"nothing to choose ({why_not})"
        return out
    try:
        choice = choose_ring(matrix)
    except NoRingError as e:
        out["detail"] = str(e)
        return out
    out["ring"] = choice.model_dump(mode="json", exclude={"matrix"})
    out["detail"] = choice.words() + ("" if choice.kept_hostfile_order else
                                      "; run with --ring-order measured, or rewrite the hostfile with "
                                      "orch hostfile --hostfile FILE --ring-order measured")
    return out


async def connect_runners(hostfile: Hostfile, opts: CheckOptions, hosts: list[HostResult], err) -> tuple[dict, dict]:
    """SSH to every remote host at once; a ``Runner`` per reachable host, an ``ssh`` row for every host.
    Close with ``close_runners`` (also after a failure: the caller's ``finally``)."""
    remote = [i for i, h in enumerate(hostfile.hosts) if not h.is_local]
    conns: dict = {}
    runners: dict[int, Runner] = {}
    if remote:
        from orchestrator.remote.ssh import connect_hosts

        conns = await connect_hosts(hostfile, opts.ssh, remote, err=err)
    for i, h in enumerate(hostfile.hosts):
        env = {**hostfile.env, **h.env}
        if h.is_local:
            hosts[i].add("ssh", "pass", "this machine (no SSH)", "local")
            runners[i] = Runner(h.name, _python_for(opts, h), env)
            continue
        hc = conns[i]
        if not hc.ok:
            hosts[i].add("ssh", "fail", f"cannot reach {h.name}: {hc.error}", _ssh_short(hc))
            continue
        runners[i] = Runner(h.name, _python_for(opts, h), env, conn=hc.conn)
    return conns, runners


async def close_runners(conns: dict, runners: dict) -> None:
    for r in runners.values():
        r.kill_all()
    if conns:
        from orchestrator.remote.ssh import close_connections

        await close_connections(conns)


def _ssh_short(hc) -> str:
    if hc.key_status == "changed":
        return "key CHANGED"
    if hc.key_status == "unknown":
        return "key unknown"
    e = hc.error or ""
    for needle, short in (("authentication", "auth failed"), ("refused", "refused"), ("no answer", "timeout"),
                          ("resolve", "unknown name"), ("no route", "no route")):
        if needle in e:
            return short
    return "unreachable"


async def probe_hosts(hostfile, hosts, runners, conns, opts, backend, mpi_local=None, mpi_error=None, mpi_prefix=None,
                      macos: bool = False) -> dict[int, dict]:
    """The host probe on every runner at once -> {host index: report}; the host rows filled in as it goes.
    ``macos``: also collect the raw macOS facts (JACCL checks, ``orch env``)."""
    kind = backends.get(backend) if backend else None  # None: no backend in view (orch env)
    mpi, rdma = bool(kind and kind.started_by_mpirun), bool(kind and kind.rdma)
    macos = macos or rdma
    config = {"staging": STAGING_DIR, "deadline": opts.timeout + 30, "mpi": mpi, "mpi_prefix": mpi_prefix,
              "macos": macos, "macos_budget": opts.timeout * 0.7}
    software = (["python", "mlx", "disk", "memory", "clock"] + (["mpi"] if mpi else [])
                + (["macos", "rdma", "thunderbolt", "bridge"] if rdma else []))

    async def one(i: int) -> Optional[dict]:
        h = hosts[i]
        runner = runners.get(i)
        if runner is None:
            for name in software:
                h.add(name, "skip", "not checked: no SSH connection", "–")
            return None
        try:
            proc = await runner.start("host", config)
        except ProbeFailed as e:
            h.add("python", "fail", str(e), "cannot start")
            for name in software[1:]:
                h.add(name, "skip", f"not checked: {e}", "–")
            return None
        try:
            rep = await read_report(proc, opts.timeout)
            samples = []
            if not h.local:
                for _ in range(CLOCK_SAMPLES):
                    sent = time.time()
                    proc.write("t\n")
                    try:
                        line = await asyncio.wait_for(proc.readline(), opts.timeout)
                    except asyncio.TimeoutError:
                        break
                    got = time.time()
                    if line.startswith("T "):
                        samples.append((sent, float(line.split()[1]), got))
        except ProbeFailed as e:
            h.add("python", "fail", str(e), "not found" if "not found" in str(e) else "failed")
            for name in software[1:]:
                h.add(name, "skip", "not checked: the python probe failed", "–")
            return None
        finally:
            await proc.finish()
        if not h.local:
            hc = conns[i]
            est = probes.clock_offset(samples)
            rtt = f", round trip {est[1] * 1000:.1f} ms" if est else ""
            key = {"known": "host key known", "accepted-new": "new host key accepted and recorded"}.get(hc.key_status, "")
            h.add("ssh", "pass", f"connected in {hc.connect_s * 1000:.0f} ms, {key}{rtt}",
                  f"{est[1] * 1000:.1f} ms" if est else "ok")
        host_checks(h, rep, samples, backend=backend, mpi_local=mpi_local, mpi_error=mpi_error, mpi_prefix=mpi_prefix,
                    python=runner.python)
        return rep

    results = await asyncio.gather(*(one(i) for i in range(len(hosts))))
    # An SSH row for connected hosts whose probe failed still says what SSH itself did.
    for i, h in enumerate(hosts):
        if "ssh" not in h.checks and i in conns and conns[i].ok:
            hc = conns[i]
            h.add("ssh", "pass", f"connected in {hc.connect_s * 1000:.0f} ms, host key {hc.key_status}", "ok")
    return {i: r for i, r in enumerate(results) if r is not None}


# ----------------------------------------------------------------------------- CLI


def add_check_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="JSON hostfile (the one orch run will use)")
    where.add_argument("-n", "--nproc", dest="n", type=int, help="check N local ranks (no hostfile)")
    p.add_argument("--backend", choices=list(backends.NAMES),
                   help="backend to check for (default: the hostfile's, else chosen from its rdma matrix as orch run does)")
    p.add_argument("--python", help="python interpreter the ranks will use (default: the hostfile's, python3 remotely)")
    p.add_argument("--collective", action="store_true", help="also run a real all_sum over all ranks: result, bandwidth, latency")
    p.add_argument("--collective-mib", type=float, default=64.0, help="size of the bandwidth all_sum in MiB (default 64)")
    p.add_argument("--link-bandwidth", action="store_true",
                   help="also measure every link between the hosts (each way) and name the ring whose slowest link is "
                        "fastest (what orch run --ring-order measured would use)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds each check may take (default 15)")
    p.add_argument("--starting-port", type=int, help="first ring port, as orch run will get it (default: a free random range)")
    p.add_argument("--mpirun", help="the Open MPI mpirun orch run will use (--backend mpi)")
    add_ssh_arguments(p, connect_timeout=False)  # --timeout bounds the connect too
    return p


def options_from_args(args: argparse.Namespace) -> CheckOptions:
    return CheckOptions(
        hostfile=args.hostfile, n=args.n, backend=args.backend, python=args.python, collective=args.collective,
        collective_mib=args.collective_mib, link_bandwidth=getattr(args, "link_bandwidth", False), json_output=args.json,
        ssh=ssh_options(args), timeout=args.timeout, starting_port=args.starting_port, mpirun=args.mpirun)


def ssh_options(args: argparse.Namespace) -> "SSHOptions":
    """``orch check`` and ``orch env`` connect within their ``--timeout`` (they have no --connect-timeout)."""
    from orchestrator.remote.ssh import SSHOptions

    return SSHOptions.from_args(args, connect_timeout=args.timeout)


def cmd_check(args: argparse.Namespace) -> int:
    """``orch check``: 0 all pass, 1 a check failed, 2 a bad hostfile or option (one line on stderr)."""
    from orchestrator.hostfile import ConfigError

    opts = options_from_args(args)
    try:
        if opts.collective_mib <= 0:
            raise ConfigError(f"--collective-mib {opts.collective_mib:g}: must be positive")
        report = asyncio.run(run_check(opts))
    except ConfigError as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    if opts.json_output:
        sys.stdout.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        sys.stdout.write(render(report))
    sys.stdout.flush()
    return EXIT_OK if report.ok else EXIT_FAIL


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orch check", description="Check that every host and ring link is ready for orch run.")
    add_check_arguments(parser)
    return cmd_check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
