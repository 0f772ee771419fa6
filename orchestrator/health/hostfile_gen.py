"""``orch hostfile``: write a hostfile that both ``orch run`` and ``mlx.launch`` accept.

``--over thunderbolt`` reads, from every Mac, ``system_profiler SPThunderboltDataType
-json`` and ``networksetup -listallhardwareports`` (over SSH, or from files saved
earlier with ``--from-dir``), finds which port is cabled to which Mac, finds a
ring (or says which cables are missing), gives every cable its own /30, prints
the ``ifconfig``/``route`` commands per host, and runs them with ``--apply``
where passwordless sudo exists. ``--over ethernet`` resolves each host's
address (or takes ``--ips``). ``--hostfile FILE --ring-order measured`` measures every link between
the hosts of an existing hostfile (a full mesh of cables, Ethernet plus Thunderbolt) and writes it
again in the order of the ring whose slowest link is fastest (``ringorder.py``, ``linkbw.py``).

Why the care with ``--apply``: the commands run as root on every host, and the
interface names in them come from each host's ``networksetup`` output, i.e. from
the other end of a network connection (or a file). So every name must look like a
BSD interface (``en5``, ``bridge0``), every address must parse as one, each
command is an argument list quoted with ``shlex`` (never text pasted into a
shell), the user sees the commands and says yes (or passes ``--yes``), and the
connections are made exactly as ``orch run`` makes them (ssh_config,
known_hosts, identities, accept-new).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from orchestrator.health.thunderbolt import (NETMASK_30, NoRingError, TopologyError, build_cable_graph, plan_rdma,
                                             plan_thunderbolt_ring)
from orchestrator.hostfile import ConfigError, parse_hostfile

IFACE = re.compile(r"^[a-z][a-z0-9]{0,15}$")  # BSD interface names: en5, bridge0 (IFNAMSIZ is 16 with the NUL)

SP_COMMAND = ["system_profiler", "SPThunderboltDataType", "-json"]
NETWORKSETUP_COMMAND = ["networksetup", "-listallhardwareports"]
IBV_DEVICES_COMMAND = ["ibv_devices"]  # macOS 26.2+; absent or failing: no RDMA on that host (as mlx.distributed_config)


def saved_outputs(directory: Path, hosts: list[str]) -> dict[str, tuple[str, str]]:
    """``<host>.sp_thunderbolt.json`` and ``<host>.networksetup.txt`` for each host."""
    out = {}
    for h in hosts:
        sp, ns = directory / f"{h}.sp_thunderbolt.json", directory / f"{h}.networksetup.txt"
        missing = [p.name for p in (sp, ns) if not p.is_file()]
        if missing:
            raise ConfigError(f"--from-dir {directory}: missing {', '.join(missing)} (save them with: "
                              f"{shlex.join(SP_COMMAND)} > {sp.name}; {shlex.join(NETWORKSETUP_COMMAND)} > {ns.name})")
        out[h] = (sp.read_text(), ns.read_text())
    return out


def saved_ibv_devices(directory: Path, hosts: list[str]) -> dict[str, Optional[str]]:
    """``<host>.ibv_devices.txt`` for each host, None where there is none (that host: no RDMA)."""
    return {h: (p.read_text() if p.is_file() else None) for h in hosts for p in [directory / f"{h}.ibv_devices.txt"]}


async def _on_hosts(hosts: list[str], args, work) -> list:
    """``await work(host, conn)`` on every host at once, over connections made like ``orch run`` makes them.
    A host that cannot be reached raises ConfigError naming it (and every other one) and why."""
    from orchestrator.hostfile import Host, Hostfile
    from orchestrator.remote.ssh import SSHOptions, close_connections, connect_hosts

    conns = await connect_hosts(Hostfile(hosts=[Host(name=h) for h in hosts]), SSHOptions.from_args(args),
                                list(range(len(hosts))))
    try:
        down = [f"{hosts[i]}: {hc.error}" for i, hc in sorted(conns.items()) if not hc.ok]
        if down:
            raise ConfigError("cannot reach " + "; ".join(down))
        return await asyncio.gather(*(work(h, conns[i].conn) for i, h in enumerate(hosts)), return_exceptions=True)
    finally:
        await close_connections(conns)


async def _ssh_outputs(hosts: list[str], args) -> tuple[dict[str, tuple[str, str]], dict[str, Optional[str]], dict[str, str]]:
    """Per host: (system_profiler, networksetup), the ``ibv_devices`` output (None if it fails there), and
    the address the SSH connection reached (the JACCL coordinator's candidate: reachable from here)."""
    async def one(host: str, conn) -> tuple[tuple[str, str], Optional[str], str]:
        sp = await conn.run(shlex.join(SP_COMMAND), check=True, timeout=60)
        ns = await conn.run(shlex.join(NETWORKSETUP_COMMAND), check=True, timeout=30)
        ibv = await conn.run(shlex.join(IBV_DEVICES_COMMAND), check=False, timeout=30)
        peer = conn.get_extra_info("peername") or ("",)
        return (str(sp.stdout), str(ns.stdout)), (str(ibv.stdout) if ibv.exit_status == 0 else None), str(peer[0])

    results = await _on_hosts(hosts, args, one)
    failed = [f"{h} ({type(r).__name__}: {r})" for h, r in zip(hosts, results) if isinstance(r, BaseException)]
    if failed:
        raise ConfigError("could not read the Thunderbolt topology from " + "; ".join(failed))
    return ({h: r[0] for h, r in zip(hosts, results)}, {h: r[1] for h, r in zip(hosts, results)},
            {h: r[2] for h, r in zip(hosts, results) if r[2]})


def _iface(host: str, name: Optional[str], what: str) -> str:
    if not isinstance(name, str) or not IFACE.match(name):
        raise ConfigError(f"{host}: networksetup names {what} {name!r}, which is not an interface name like en5 or "
                          "bridge0; refusing to use it (check that host's `networksetup -listallhardwareports`)")
    return name


def _ipv4(host: str, value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"{host}: {value!r} is not an IPv4 address") from None


def thunderbolt_hostfile(outputs: dict[str, tuple[str, str]], base: str) -> tuple[dict, dict[str, list[list[str]]]]:
    """The (ring) hostfile and, per host, the commands (argument lists) that set its Thunderbolt addresses."""
    plan, commands = thunderbolt_plan(outputs, base)
    return plan.hostfile, commands


def thunderbolt_plan(outputs: dict[str, tuple[str, str]], base: str):
    """The ``ThunderboltPlan`` and, per host, the commands (argument lists) that set its Thunderbolt addresses.

    The commands are built here from checked parts, not taken as text: an interface
    name must match ``IFACE`` and every address must parse.
    """
    try:
        ipaddress.IPv4Address(base)
    except ValueError:
        raise ConfigError(f"--base {base!r}: not an IPv4 address (e.g. --base 192.168.0.0)") from None
    try:
        graph = build_cable_graph(outputs)
        plan = plan_thunderbolt_ring(graph, base=base)
    except NoRingError as e:
        raise ConfigError(e.search.message) from None
    except TopologyError as e:
        raise ConfigError(str(e)) from None
    commands: dict[str, list[list[str]]] = {}
    for h in plan.ring:
        bridge = _iface(h, graph.parsed[h].bridge or "bridge0", "the Thunderbolt Bridge")
        cmds = [["sudo", "ifconfig", bridge, "down"]]
        for ln in plan.links:
            if h not in (ln.a.host, ln.b.host):
                continue
            me, peer = ln.end(h), ln.other(h)
            iface = _iface(h, me.iface, f"the port cabled to {peer.host}")
            _iface(peer.host, peer.iface, f"the port cabled to {h}")
            cmds.append(["sudo", "ifconfig", iface, "inet", _ipv4(h, me.ip), "netmask", NETMASK_30])
            cmds.append(["sudo", "route", "change", _ipv4(peer.host, peer.ip), "-interface", iface])
        commands[h] = cmds
    return plan, commands


def rdma_hostfile(plan, ibv: dict[str, Optional[str]], coordinator_ips: dict[str, str]) -> tuple[dict, str]:
    """``plan.hostfile`` with the ``rdma`` matrix and JACCL backend where every host lists its devices, and why.

    ``ibv``: each host's ``ibv_devices`` output (None: not available there). When every
    host has RDMA devices, the hostfile gets the ``rdma`` matrix of the same cables and
    ``backend`` jaccl (every pair cabled) or jaccl-ring, as ``mlx.distributed_config``
    writes it (``thunderbolt.plan_rdma``); otherwise it stays a ring hostfile.

    ``ibv_devices`` is parsed strictly (the recorded shape only; anything else is an
    error naming the host). JACCL's ranks meet at rank 0's first address
    (``MLX_JACCL_COORDINATOR``), which every host must reach: with two hosts that is
    rank 0's address on their cable; with more, a Thunderbolt /30 reaches only one
    neighbour, so each host's ``ips`` become its address from ``coordinator_ips``
    (the SSH address, or ``--ips``), as ``mlx.distributed_config`` writes them (en0's);
    the per-cable addresses stay in ``links``.
    """
    from orchestrator.health.jaccl_checks import Unreadable, parse_ibv_devices

    devices: dict[str, Optional[list[str]]] = {}
    for h in plan.ring:
        text = ibv.get(h)
        try:
            devices[h] = None if text is None else parse_ibv_devices(text)
        except Unreadable as e:
            raise ConfigError(f"{h}: {e}") from None
    try:
        rp = plan_rdma(plan, devices)
    except TopologyError as e:
        raise ConfigError(str(e)) from None
    reason = f"backend {rp.backend}: {rp.reason}"
    if rp.rdma is None:
        return plan.hostfile, reason
    entries = [dict(e) for e in plan.hostfile["hosts"]]
    if len(entries) > 2:
        missing = [e["ssh"] for e in entries if not coordinator_ips.get(e["ssh"])]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: no address that every host reaches (JACCL's ranks meet at rank 0's "
                              "first address; a Thunderbolt /30 reaches one neighbour only): give each host's Ethernet or "
                              "Wi-Fi address with --ips a,b,c in --hosts order")
        for e in entries:
            e["ips"] = [_ipv4(e["ssh"], coordinator_ips[e["ssh"]])]
    for e, row in zip(entries, rp.rdma):
        e["rdma"] = row
    return {**plan.hostfile, "backend": rp.backend, "hosts": entries}, reason


def ethernet_hostfile(hosts: list[str], ips: Optional[list[str]]) -> dict:
    if ips is not None and len(ips) != len(hosts):
        raise ConfigError(f"--ips gives {len(ips)} addresses for {len(hosts)} hosts; give one per host, in --hosts order")
    if ips is None:
        ips = []
        for h in hosts:
            try:
                ips.append(socket.getaddrinfo(h, None, socket.AF_INET)[0][4][0])
            except socket.gaierror:
                raise ConfigError(f"cannot resolve {h}; give the addresses with --ips a,b,...") from None
    return {"backend": "ring", "envs": [], "hosts": [{"ssh": h, "ips": [ip]} for h, ip in zip(hosts, ips)]}


async def _apply(commands: dict[str, list[list[str]]], args) -> list[str]:
    """Run each host's commands with ``sudo -n`` (never prompts for a password); returns problems."""
    async def one(host: str, conn) -> Optional[str]:
        for argv in commands[host]:
            if argv[0] == "sudo":
                argv = ["sudo", "-n", *argv[1:]]
            line = shlex.join(argv)
            r = await conn.run(line, timeout=30)
            if r.exit_status != 0:
                return f"{host}: `{line}` failed: {str(r.stderr).strip()[:200]}"
        return None

    hosts = list(commands)
    results = await _on_hosts(hosts, args, one)
    return [r if isinstance(r, str) else f"{h}: {type(r).__name__}: {r}"
            for h, r in zip(hosts, results) if r is not None]


def _confirmed(args, n_hosts: int) -> bool:
    """--yes, or a y from the terminal. No terminal and no --yes: ConfigError (exit 2)."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigError("--apply runs the commands above as root: confirm at a terminal, or add --yes")
    sys.stderr.write(f"orch: run these commands with sudo on {n_hosts} host{'s' if n_hosts > 1 else ''}? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def measured_order(data, source: str, args) -> tuple[Any, str]:
    """``--ring-order measured``: the hostfile JSON ``data`` rewritten in the order of the fastest ring, and the words.

    The raw entries are kept as they were (every field, every shape); only their order changes and,
    for entries with ``ips``, which address comes first (the one on the fastest path to the left
    neighbour, ``ringorder.apply_order``).
    """
    from orchestrator.probe.linkbw import measure_hostfile, needs_measuring
    from orchestrator.plan.ringorder import NoRingError, apply_order, choose_ring

    hostfile = parse_hostfile(data, source)
    why_not = needs_measuring(hostfile)
    if why_not:
        return data, f"--ring-order measured: nothing to choose ({why_not}); the order is unchanged"
    try:
        from orchestrator.remote.ssh import SSHOptions

        matrix = asyncio.run(measure_hostfile(hostfile, SSHOptions.from_args(args), python=getattr(args, "python", None),
                                              timeout=args.connect_timeout))
        choice = choose_ring(matrix)
    except (NoRingError, ConfigError) as e:
        raise ConfigError(f"--ring-order measured: {e}") from None
    ordered = apply_order(hostfile, choice)
    entries = data if isinstance(data, list) else data["hosts"]
    new_entries = []
    for k, i in enumerate(choice.order):
        entry = entries[i]
        if isinstance(entry, dict) and isinstance(entry.get("ips"), list):
            entry = {**entry, "ips": list(ordered.hosts[k].ips)}
        new_entries.append(entry)
    words = choice.words() + f" (links measured in {matrix.seconds:.1f}s)"
    return (new_entries if isinstance(data, list) else {**data, "hosts": new_entries}), words


def _read_json(path: str):
    from orchestrator.hostfile import load_hostfile

    load_hostfile(path)  # every check orch run makes (file type, encoding, fields), with its one-line errors
    return json.loads(Path(path).read_text())


def cmd_hostfile(args) -> int:
    commands: dict[str, list[list[str]]] = {}
    measured = getattr(args, "ring_order", "hostfile") == "measured"
    if getattr(args, "hostfile", None):
        data = _read_json(args.hostfile)
        if not measured:
            raise ConfigError(f"--hostfile {args.hostfile}: nothing to do; add --ring-order measured to write it in the "
                              "order of the fastest ring")
        data, words = measured_order(data, args.hostfile, args)
        sys.stderr.write(f"orch: {words}\n")
        hosts = []
    else:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        if len(hosts) < 2:
            raise ConfigError("--hosts needs at least two hosts, e.g. --hosts mac1,mac2")
    if hosts and args.over == "thunderbolt":
        if measured:
            raise ConfigError("--ring-order measured measures links that already carry addresses: write the Thunderbolt "
                              "hostfile and set its addresses (--apply) first, then run orch hostfile --hostfile FILE "
                              "--ring-order measured")
        addresses: dict[str, str] = {}
        if args.from_dir:
            outputs, ibv = saved_outputs(Path(args.from_dir), hosts), saved_ibv_devices(Path(args.from_dir), hosts)
        else:
            outputs, ibv, addresses = asyncio.run(_ssh_outputs(hosts, args))
        if args.ips:
            given = [ip.strip() for ip in args.ips.split(",")]
            if len(given) != len(hosts):
                raise ConfigError(f"--ips gives {len(given)} addresses for {len(hosts)} hosts; give one per host, in --hosts order")
            addresses = dict(zip(hosts, given))
        plan, commands = thunderbolt_plan(outputs, args.base)
        data, reason = rdma_hostfile(plan, ibv, addresses)
        sys.stderr.write(f"orch: {reason}\n")
    elif hosts:
        data = ethernet_hostfile(hosts, args.ips.split(",") if args.ips else None)
        if measured:
            data, words = measured_order(data, "<generated>", args)
            sys.stderr.write(f"orch: {words}\n")
    parse_hostfile(data, args.output or "<generated>")  # what we write must load
    text = json.dumps(data, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        entries = data if isinstance(data, list) else data["hosts"]
        names = [parse_hostfile(data, args.output).hosts[i].name for i in range(len(entries))]
        sys.stderr.write(f"orch: wrote {args.output} ({len(entries)} hosts, ring order {', '.join(names)})\n")
    else:
        sys.stdout.write(text)
    if commands:
        sys.stderr.write("orch: set the Thunderbolt addresses with (per host):\n")
        for host, cmds in commands.items():
            sys.stderr.write(f"  {host}:\n" + "".join(f"    {shlex.join(c)}\n" for c in cmds))
        if args.apply:
            if not _confirmed(args, len(commands)):
                sys.stderr.write("orch: --apply: nothing was run\n")
                return 1
            problems = asyncio.run(_apply(commands, args))
            for p in problems:
                sys.stderr.write(f"orch: --apply: {p}\n")
            if problems:
                return 1
            sys.stderr.write("orch: addresses applied on every host\n")
    return 0
