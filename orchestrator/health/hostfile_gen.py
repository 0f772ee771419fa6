"""``orch hostfile``: write a hostfile that both ``orch run`` and ``mlx.launch`` accept.

``--over thunderbolt`` reads, from every Mac, ``system_profiler SPThunderboltDataType
-json`` and ``networksetup -listallhardwareports`` (over SSH, or from files saved
earlier with ``--from-dir``), finds which port is cabled to which Mac, finds a
ring (or says which cables are missing), gives every cable its own /30, prints
the ``ifconfig``/``route`` commands per host, and runs them with ``--apply``
where passwordless sudo exists. ``--over ethernet`` resolves each host's
address (or takes ``--ips``).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import sys
from pathlib import Path
from typing import Optional

from orchestrator.health.thunderbolt import NoRingError, TopologyError, plan_thunderbolt_ring
from orchestrator.hostfile import ConfigError, parse_hostfile

SP_COMMAND = ["system_profiler", "SPThunderboltDataType", "-json"]
NETWORKSETUP_COMMAND = ["networksetup", "-listallhardwareports"]


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


async def _ssh_outputs(hosts: list[str], ssh_config: Optional[str], known_hosts: Optional[str],
                       timeout: float) -> dict[str, tuple[str, str]]:
    import asyncssh

    async def one(host: str) -> tuple[str, str]:
        opts = {"config": [ssh_config] if ssh_config else ()}
        if known_hosts:
            opts["known_hosts"] = known_hosts
        async with asyncssh.connect(host, connect_timeout=timeout, **opts) as conn:
            sp = await conn.run(shlex.join(SP_COMMAND), check=True, timeout=60)
            ns = await conn.run(shlex.join(NETWORKSETUP_COMMAND), check=True, timeout=30)
            return str(sp.stdout), str(ns.stdout)

    results = await asyncio.gather(*(one(h) for h in hosts), return_exceptions=True)
    failed = [f"{h} ({type(r).__name__}: {r})" for h, r in zip(hosts, results) if isinstance(r, BaseException)]
    if failed:
        raise ConfigError("could not read the Thunderbolt topology from " + "; ".join(failed))
    return dict(zip(hosts, results))


def thunderbolt_hostfile(outputs: dict[str, tuple[str, str]], base: str) -> tuple[dict, dict[str, list[str]]]:
    try:
        plan = plan_thunderbolt_ring(outputs, base=base)
    except NoRingError as e:
        raise ConfigError(e.search.message) from None
    except TopologyError as e:
        raise ConfigError(str(e)) from None
    return plan.hostfile, plan.commands


def ethernet_hostfile(hosts: list[str], ips: Optional[list[str]]) -> dict:
    if ips is not None and len(ips) != len(hosts):
        raise ConfigError(f"--ips gives {len(ips)} addresses for {len(hosts)} hosts")
    if ips is None:
        ips = []
        for h in hosts:
            try:
                ips.append(socket.getaddrinfo(h, None, socket.AF_INET)[0][4][0])
            except socket.gaierror:
                raise ConfigError(f"cannot resolve {h}; give the addresses with --ips a,b,...") from None
    return {"backend": "ring", "envs": [], "hosts": [{"ssh": h, "ips": [ip]} for h, ip in zip(hosts, ips)]}


async def _apply(commands: dict[str, list[str]], ssh_config: Optional[str], timeout: float) -> list[str]:
    """Run each host's commands with ``sudo -n`` (never prompts); returns problems."""
    import asyncssh

    async def one(host: str, cmds: list[str]) -> Optional[str]:
        try:
            async with asyncssh.connect(host, connect_timeout=timeout, config=[ssh_config] if ssh_config else ()) as conn:
                for c in cmds:
                    line = c.replace("sudo ", "sudo -n ", 1) if c.startswith("sudo ") else c
                    r = await conn.run(line, timeout=30)
                    if r.exit_status != 0:
                        return f"{host}: `{line}` failed: {str(r.stderr).strip()[:200]}"
        except (OSError, asyncssh.Error) as e:
            return f"{host}: {e}"
        return None

    return [p for p in await asyncio.gather(*(one(h, c) for h, c in commands.items())) if p]


def cmd_hostfile(args) -> int:
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if len(hosts) < 2:
        raise ConfigError("--hosts needs at least two hosts, e.g. --hosts mac1,mac2")
    commands: dict[str, list[str]] = {}
    if args.over == "thunderbolt":
        outputs = saved_outputs(Path(args.from_dir), hosts) if args.from_dir else asyncio.run(
            _ssh_outputs(hosts, args.ssh_config, args.known_hosts, args.connect_timeout))
        data, commands = thunderbolt_hostfile(outputs, args.base)
    else:
        data = ethernet_hostfile(hosts, args.ips.split(",") if args.ips else None)
    parse_hostfile(data, args.output or "<generated>")  # what we write must load
    text = json.dumps(data, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        sys.stderr.write(f"orch: wrote {args.output} ({len(data['hosts'])} hosts, ring order {', '.join(h['ssh'] for h in data['hosts'])})\n")
    else:
        sys.stdout.write(text)
    if commands:
        sys.stderr.write("orch: set the Thunderbolt addresses with (per host):\n")
        for host, cmds in commands.items():
            sys.stderr.write(f"  {host}:\n" + "".join(f"    {c}\n" for c in cmds))
        if args.apply:
            problems = asyncio.run(_apply(commands, args.ssh_config, args.connect_timeout))
            for p in problems:
                sys.stderr.write(f"orch: --apply: {p}\n")
            if problems:
                return 1
            sys.stderr.write("orch: addresses applied on every host\n")
    return 0
