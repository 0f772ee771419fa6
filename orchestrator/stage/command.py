"""``orch stage SRC (--hostfile H | --hosts a,b) --to DEST``: the command line and its entry point.

``add_stage_arguments`` only touches argparse (``orch``'s parser must stay cheap to build);
``cmd_stage`` checks the input (one line and exit 2 for anything the user must fix), runs the
stage (``chain.run_stage``) and prints the summary (``--json``: as JSON on stdout).
"""

from __future__ import annotations

import argparse
import os

STATE_DIR = ".orch-stage"  # relay.STATE_DIR (the relay is not imported here: it runs on the hosts)
import posixpath
import sys


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    from orchestrator.remote import add_ssh_arguments

    p.add_argument("src", metavar="SRC", help="the file or folder to put on every host (a folder's contents go into DEST)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="JSON hostfile: the hosts, in ring order, and their ring addresses (ips)")
    where.add_argument("--hosts", help="comma-separated SSH host names instead of a hostfile")
    p.add_argument("--to", dest="dest", metavar="DEST", required=True,
                   help="the folder on every host (absolute, or starting with ~/); made if missing")
    p.add_argument("--python", help="the interpreter that runs the relay on every host (default: the hostfile's, else python3)")
    p.add_argument("--verify", action="store_true",
                   help="hash every file already in DEST, even those unchanged since a stage verified them")
    p.add_argument("--json", dest="json_output", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    add_ssh_arguments(p)


class StageUsageError(Exception):
    pass


def check_dest(dest: str) -> str:
    if "\0" in dest or "\n" in dest:
        raise StageUsageError("--to: a path without NUL or newline characters")
    if not (dest.startswith("/") or dest == "~" or dest.startswith("~/")):
        raise StageUsageError(f"--to {dest!r}: give an absolute path on the hosts (e.g. /Users/me/models/x) "
                              "or one that starts with ~/")
    norm = posixpath.normpath(dest)
    if norm in ("/", "~"):
        raise StageUsageError(f"--to {dest!r}: give a folder for the files, not the root of the disk or home")
    if ".." in dest.split("/"):
        raise StageUsageError(f"--to {dest!r}: a path without '..' (give the folder it means)")
    return norm


def cmd_stage(args: argparse.Namespace) -> int:
    import asyncio

    from orchestrator.hostfile import ConfigError, hosts_hostfile, load_hostfile
    from orchestrator.stage.source import SourceError, walk_source

    try:
        dest = check_dest(args.dest)
        if not os.path.exists(os.path.expanduser(args.src)):
            raise StageUsageError(f"SRC {args.src!r}: no such file or folder (give the model folder or file to stage)")
        if not args.hostfile and not args.hosts:
            raise StageUsageError("give the hosts: --hostfile H or --hosts a,b")
        hostfile = load_hostfile(args.hostfile) if args.hostfile else hosts_hostfile(args.hosts)
        source = walk_source(args.src)
    except (StageUsageError, SourceError) as e:
        sys.stderr.write(f"orch: error: {e} (see 'orch stage --help')\n")
        return 2
    except ConfigError as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return 2

    from orchestrator.remote.ssh import SSHOptions
    from orchestrator.stage.chain import StageRequest, run_stage
    from orchestrator.stage.progress import summary_text

    req = StageRequest(src=args.src, dest=dest, hostfile=hostfile, ssh=SSHOptions.from_args(args),
                       python=args.python, verify=args.verify)
    try:
        summary = asyncio.run(run_stage(req, source, sys.stderr, progress=not args.quiet))
    except SourceError as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"\norch stage: interrupted; what arrived stays in {dest}/{STATE_DIR} on each host: the same "
                         "command continues from there\n")
        return 130
    if args.json_output:
        sys.stdout.write(summary.model_dump_json() + "\n")
    else:
        sys.stdout.write(summary_text(summary) + "\n")
    return summary.exit_code
