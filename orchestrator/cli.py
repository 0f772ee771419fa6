"""``orch``: arguments in, calls out. No logic lives here.

What a rank runs, in three forms (as ``mlx.launch`` users know them)::

    orch run [OPTIONS] SCRIPT.py [OPTIONS] [-- ARGS]    a Python file
    orch run [OPTIONS] -m MODULE [OPTIONS] [-- ARGS]    python -m MODULE (packages, relative imports)
    orch run [OPTIONS] -- PROGRAM [ARGS]                any executable or console script;
                                                        "-- -m mod ..." goes to the rank's Python

Argument routing cannot surprise: the program's own arguments go after ``--``,
verbatim. Before ``--`` every option is orch's: an unknown one is an error
with a did-you-mean, never handed to the program; an option given twice or a
second program is an error (``orch run -n 2 train.py -n 5`` used to start five
ranks).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

from orchestrator import __version__, backends
from orchestrator.remote import add_ssh_arguments

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for any tool whose reader went away
OPEN_FILES_WANTED = 65536
OPEN_MAX_DARWIN = 10240  # macOS refuses a larger RLIMIT_NOFILE even when the hard limit is "unlimited"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, never a traceback
        # self.prog is "orch" for the top level and "orch run" for a subcommand: name the program once.
        self.exit(EXIT_USAGE, f"orch: error: {message} (see '{self.prog} --help')\n")


def _run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="start a program on every rank and supervise it",
                       usage="orch run [OPTIONS] (SCRIPT.py | -m MODULE) [OPTIONS] [-- ARGS]  |  orch run [OPTIONS] -- PROGRAM [ARGS]",
                       description="Start a program on every rank: a Python file, a module (-m), or any command after --. "
                                   "The program's own arguments go after --.")
    p.add_argument("script", nargs="?", help="the Python file every rank runs")
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module as `python -m MODULE` on every rank")
    p.add_argument("--hosts", help="comma-separated SSH host names instead of a hostfile (like mlx.launch); "
                                   "with -n K, K ranks on each host")
    p.add_argument("--include", help="comma-separated host names: run only on these hosts of the hostfile")
    p.add_argument("--exclude", help="comma-separated host names: leave these hosts of the hostfile out")
    where = p.add_mutually_exclusive_group()
    p.add_argument("-n", "--nproc", dest="n", type=int, help="number of local ranks (no hostfile); with --hosts, ranks per host")
    where.add_argument("--hostfile", help="JSON hostfile (mlx.launch's format or {\"hosts\": [...]})")
    p.add_argument("--backend", choices=list(backends.NAMES),
                   help="communication backend (default: the hostfile's; else jaccl/jaccl-ring when its rdma matrix "
                        "links every pair/each ring neighbour, as mlx.distributed_config chooses; else ring)")
    p.add_argument("--fallback-backend", choices=list(backends.FALLBACKS),
                   help="with --max-restarts: when JACCL fails to start (RDMA off, device missing, link down), "
                        "restart on this backend over the same hosts from the latest checkpoint")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="set an environment variable on every rank")
    p.add_argument("--cwd", help="working directory of every rank")
    p.add_argument("--python", help="python interpreter for the ranks (default: this one, or the hostfile's)")
    p.add_argument("--run-dir", help="where logs, events, checkpoints and summary.json go (default: runs/<time>-<script>)")
    p.add_argument("--init-timeout", type=float, default=60.0, help="seconds for all ranks to join once one calls init (default 60)")
    p.add_argument("--hang-timeout", type=float, default=300.0, help="stop the run when no rank reports a step for this long (default 300 s): the ceiling")
    p.add_argument("--hang-floor", type=float, default=30.0,
                   help="once steps come at a known pace, stop the run when none comes for max(this, 10x the slowest "
                        "interval seen) outside evaluation and checkpoint phases (default 30 s)")
    p.add_argument("--first-step-timeout", type=float, default=120.0, help="seconds from a trainer's start to its first step (default 120)")
    p.add_argument("--max-restarts", type=int, default=0, help="after a failure or hang, restart the whole job from the latest checkpoint up to K times")
    p.add_argument("--exclude-failed-host", action="store_true", help="with --max-restarts: restart without a host that caused two failures (smaller world)")
    p.add_argument("--restart-backoff", type=float, default=1.0, help="seconds before the first restart, doubling each time (max 30)")
    p.add_argument("--grace", type=float, default=1.0, help="seconds between SIGTERM and SIGKILL when stopping ranks (default 1)")
    p.add_argument("--connections-per-ip", type=int, default=1, help="ring connections per address (like mlx.launch)")
    p.add_argument("--starting-port", type=int, help="first ring port (default: a free random range)")
    p.add_argument("--ring-order", choices=["hostfile", "measured"], default="hostfile",
                   help="ring backend: the hostfile's order (default), or measure every link between the hosts first "
                        "and use the ring whose slowest link is fastest (full meshes, Ethernet plus Thunderbolt)")
    # dest: every option's dest is its RunRequest field (cmd_run copies them by name).
    p.add_argument("--quiet", dest="echo", action="store_false", help="do not echo rank output (it is still logged)")
    p.add_argument("--json", dest="json_output", action="store_true",
                   help="print the final summary as JSON on stdout (rank output goes to stderr)")
    p.add_argument("--bind", action="store_true", help="pin each rank to its own block of CPU cores (Linux; no-op on macOS)")
    p.add_argument("--stdin", choices=["none", "rank0", "all"], default="none",
                   help="forward orch's stdin to rank 0 or to every rank (pdb, chat-style scripts); the others read "
                        "/dev/null (default: none, every rank reads /dev/null)")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --run-dir as a restart would: from its newest complete checkpoint "
                        "(mlx-lm's LoRA trainer exactly; a recipe gets --resume; with --resume-arg the newest match)")
    p.add_argument("--resume-from", metavar="GLOB",
                   help="with --resume-arg: the files a restarted attempt resumes from (the newest match wins); "
                        "relative to the run directory, e.g. 'adapters/*_adapters.safetensors'")
    p.add_argument("--resume-arg", metavar="TEMPLATE",
                   help="with --max-restarts and --resume-from: words added to the program's arguments on a restart, "
                        "{latest} replaced by the newest match, e.g. '--resume-adapter-file {latest}' "
                        "(one word that starts with '-' is written --resume-arg=--checkpoint={latest})")
    ssh = add_ssh_arguments(p)  # the same SSH options as orch check, env and hostfile (remote/ssh.py: SSHOptions)
    ssh.add_argument("--stage", action="append", default=[], metavar="PATH", help="also upload PATH to every host (the script's directory always is)")
    ssh.add_argument("--stage-to", action="append", default=[], metavar="SRC:DEST",
                     help="before the ranks start, put SRC (a model folder) at DEST on every host, host to host along the "
                          "ring, as orch stage does (repeatable)")
    mpi = p.add_argument_group("MPI (--backend mpi)")
    mpi.add_argument("--mpirun", help="the Open MPI mpirun to use (default: this environment's, then PATH)")
    mpi.add_argument("--mpi-arg", action="append", default=[], dest="mpi_args", metavar="ARGS", help="extra arguments for mpirun (repeatable)")
    return p


def build_parser(with_check_options: bool = True) -> argparse.ArgumentParser:
    """``with_check_options=False`` skips importing the checks (asyncio & co, ~0.15 s) on the run path."""
    parser = _Parser(prog="orch", description="Launch and supervise distributed MLX training.")
    parser.add_argument("-V", "--version", action="version", version=f"orch {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _run_parser(sub)
    chk = sub.add_parser("check", help="check hosts, software and every ring link before a run",
                         description="Check that every host and ring link is ready for orch run.")
    if with_check_options:
        from orchestrator.health.check import add_check_arguments

        add_check_arguments(chk)
    env = sub.add_parser("env", help="describe every host (OS, Python, MLX, orch, Metal, Thunderbolt, RDMA) for a bug report",
                         description="Describe every host for a bug report (this machine without --hostfile).")
    if with_check_options:
        from orchestrator.health.env import add_env_arguments

        add_env_arguments(env)
    gen = sub.add_parser("hostfile", help="write a hostfile from a host list (Ethernet or Thunderbolt ring)",
                         description="Write a hostfile that orch run and mlx.launch both accept.")
    gen_from = gen.add_mutually_exclusive_group(required=True)
    gen_from.add_argument("--hosts", help="comma-separated SSH names, e.g. mac1,mac2,mac3")
    gen_from.add_argument("--hostfile", help="start from this hostfile (e.g. every cable's address of a full mesh) "
                                             "and write it again in --ring-order")
    gen.add_argument("--ring-order", choices=["hostfile", "measured"], default="hostfile",
                     help="measured: measure every link between the hosts (over SSH) and write them in the order of "
                          "the ring whose slowest link is fastest")
    gen.add_argument("--python", help="with --ring-order measured: the interpreter for the link probe on every host "
                                      "(default: the hostfile's, else python3)")
    gen.add_argument("--over", choices=["ethernet", "thunderbolt"], default="ethernet")
    gen.add_argument("-o", "--output", help="file to write (default: stdout)")
    gen.add_argument("--ips", help="ethernet: the addresses, in host order (default: resolve the names); thunderbolt: each host's address every host reaches (the JACCL coordinator, 3+ hosts)")
    gen.add_argument("--from-dir", help="thunderbolt: read <host>.sp_thunderbolt.json, <host>.networksetup.txt and optionally <host>.ibv_devices.txt from here instead of SSH")
    gen.add_argument("--base", default="192.168.0.0", help="thunderbolt: first address of the /30s (default 192.168.0.0)")
    gen.add_argument("--apply", action="store_true", help="thunderbolt: run the ifconfig/route commands over SSH with sudo -n (asks first)")
    gen.add_argument("--yes", action="store_true", help="with --apply: do not ask (for scripts)")
    add_ssh_arguments(gen)
    stg = sub.add_parser("stage", help="put a file or folder on every host, relayed host to host along the ring",
                         description="Put SRC into DEST on every host: the bytes leave this machine once and are "
                                     "relayed host to host; what a host already has is skipped; an interrupted "
                                     "stage continues where it stopped.")
    from orchestrator.stage.command import add_stage_arguments

    add_stage_arguments(stg)
    rep = sub.add_parser("report", help="write RUN_DIR/report.html and plots; print the summary",
                         description="Write RUN_DIR/report.html (self-contained) and RUN_DIR/report/*.png.")
    rep.add_argument("run_dir", help="a run directory (with summary.json or events.jsonl)")
    runs = sub.add_parser("runs", help="list recent runs, newest first", description="List the runs under ROOT.")
    runs.add_argument("root", nargs="?", default="runs", help="directory of run directories (default: runs)")
    runs.add_argument("-n", "--limit", type=int, default=20, help="how many to show (default 20; 0: all)")
    return parser


def _split_script_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _program(args: argparse.Namespace, after: list[str]) -> tuple[str, str, list[str]]:
    """(kind, what, arguments) of the program every rank runs; see the module docstring."""
    if args.module and args.script:
        raise UsageError(f"two programs: {args.script} and -m {args.module}; give one (the program's arguments go after --)")
    if args.module:
        return "module", args.module, after
    if args.script:
        return "script", args.script, after
    if not after:
        raise UsageError("no program: give SCRIPT.py, -m MODULE, or -- PROGRAM [ARGS]")
    if after[0] == "-m" and len(after) > 1:  # "-- -m mod ...": the rank's Python runs the module, as mlx.launch does
        return "module", after[1], after[2:]
    return "command", after[0], after[1:]


class UsageError(Exception):
    """A command line orch cannot read as the user meant it: one line, exit 2."""


def _did_you_mean(parser: argparse.ArgumentParser, option: str) -> str:
    import difflib

    name = option.split("=", 1)[0]
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_routing(parser: argparse.ArgumentParser, own: list[str]) -> None:
    """Before ``--`` every option is orch's: unknown ones and ones given twice are errors."""
    seen: dict[str, str] = {}
    waiting: Optional[str] = None  # an option whose value is the next word
    for token in own:
        if waiting and token.startswith("-") and token != "-" and not _is_number(token) and " " not in token:
            raise UsageError(f"{waiting} needs a value; one that starts with '-' is written {waiting}=VALUE "
                             f"(e.g. {waiting}={token})")
        waiting = None
        if not token.startswith("-") or token == "-" or _is_number(token) or " " in token:
            continue  # with a space it is a value (--resume-arg '--resume-adapter-file {latest}'), as argparse reads it
        name = token.split("=", 1)[0]
        action = parser._option_string_actions.get(name)
        if action is None:
            # argparse also accepts unambiguous prefixes (--hang-time); leave those to it.
            matches = [o for o in parser._option_string_actions if o.startswith(name) and name.startswith("--")]
            if len(matches) == 1:
                action = parser._option_string_actions[matches[0]]
            else:
                raise UsageError(f"unknown option {name}{_did_you_mean(parser, name)}; "
                                 "the program's own arguments go after --")
        if action.nargs is None and "=" not in token:
            waiting = name
        if isinstance(action, argparse._AppendAction):
            continue
        if action.dest in seen:
            again = name if seen[action.dest] == name else f"{name} (also given as {seen[action.dest]})"
            raise UsageError(f"{again} given twice; give it once")
        seen[action.dest] = name


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def cmd_run(args: argparse.Namespace, after: list[str]) -> int:
    """``orch run``: the parsed options become a ``RunRequest`` by name (each option's dest is its field).

    Built with ``model_construct``: argparse already typed every value (``type=``, ``choices=``,
    list defaults), and validating them again would build the request's validator, ~17 ms of
    every launch before a rank gets its configuration. ``tests/test_cli_request.py`` checks that
    what the parser hands over is what validation would give.
    """
    from orchestrator.run import RunRequest, run_job

    interrupts_now()
    kind, program, program_args = _program(args, after)
    options = {k: v for k, v in vars(args).items() if k in RunRequest.model_fields}
    req = RunRequest.model_construct(**{**options, "script": program, "program": kind, "script_args": program_args})
    summary = run_job(req)
    if req.json_output:
        from orchestrator.report import final_json

        sys.stdout.write(final_json(summary) + "\n")
    return summary.exit_code


def _prestart_local_ranks(args: argparse.Namespace) -> None:
    """``orch run ... -n N`` on this machine: start the ranks' Python and MLX import now (launch/prespawn.py).

    Reads the parsed arguments (parsing is cheap: argparse only), so what is
    pre-started is exactly what the run will use; anything else (a hostfile,
    another Python or backend) starts ranks the ordinary way.
    """
    if (args.command != "run" or not args.n or not 1 <= args.n <= 1024 or args.hostfile or args.hosts
            or args.python or not backends.local_ranks_prestartable(args.backend) or args.stdin != "none"):
        return
    from orchestrator.launch import prespawn

    prespawn.start(args.n)


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``min(hard, wanted)``.

    Each local rank costs the controller several descriptors (pipes, pidfd, its
    log), and macOS starts processes with a soft limit of 256: 64 local ranks
    would run out. Ranks inherit the raised limit, which their sockets need too.
    Done first in ``main`` so the ranks pre-started for ``-n N`` inherit it.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    for limit in (target, min(target, OPEN_MAX_DARWIN)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            return
        except (ValueError, OSError):
            continue


def main(argv: Optional[list[str]] = None) -> int:
    """The entry point: exit codes, and no traceback for Ctrl-C or a reader that went away.

    Ctrl-C before the supervisor owns the signals (parsing, loading, planning,
    connecting) exits 130 like Ctrl-C later does. ``orch runs | head``: once
    ``head`` exits, writes fail with EPIPE; stdout is pointed at /dev/null (so
    the interpreter's last flush cannot fail again) and orch exits 141, as a
    tool killed by SIGPIPE would.
    """
    try:
        raise_open_file_limit()
        argv = list(sys.argv[1:] if argv is None else argv)
        own, after = _split_script_args(argv)
        try:
            code = _main(own, after)
            sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit flush
            return code
        finally:
            from orchestrator.launch import prespawn

            prespawn.discard()
    except KeyboardInterrupt:
        sys.stderr.write("orch: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def entry() -> None:
    """The ``orch`` command (and ``python -m orchestrator``): ``main``, then a quick exit.

    The interpreter's own teardown (unloading pydantic, asyncssh and cryptography module by module) costs a
    launch ~50 ms after everything is done. Once ``main`` has returned, no thread of ours is left and every
    file is closed; the buffers of any file object still open are flushed here, which is all the teardown
    would still have done for the user, and the process ends with ``main``'s code. In-process callers (tests)
    call ``main`` and keep the normal teardown.
    """
    defer_interrupts()
    code = main()
    import gc
    import io
    import threading

    if threading.active_count() > 1:  # never cut a thread short: the normal exit joins it
        sys.exit(code)
    for obj in gc.get_objects():
        if isinstance(obj, io.IOBase):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except (OSError, ValueError):
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout:
                code = code or EXIT_BROKEN_PIPE
    os._exit(code)


_interrupted: list[int] = []  # Ctrl-Cs noted while orch loads itself


def _note_interrupt(signum, frame) -> None:
    _interrupted.append(signum)


def defer_interrupts() -> None:
    """From the ``orch`` command's first line until its command's modules are loaded, a Ctrl-C is noted, not raised.

    A ``KeyboardInterrupt`` raised inside an import leaves a traceback through importlib, and inside
    pydantic-core's or cryptography's Rust import it became a ``PanicException``: both were what a Ctrl-C
    in a launch's first 0.2 s showed. ``interrupts_now`` raises the noted one where nothing is half-loaded.
    Also set when the shell started orch with SIGINT ignored (a background job): from then on orch honours
    SIGINT the same way throughout, as its supervisor does. Children do not inherit a handler (exec resets it).
    """
    signal.signal(signal.SIGINT, _note_interrupt)


def interrupts_now() -> None:
    """A command's modules are loaded: Ctrl-C raises ``KeyboardInterrupt`` again (asyncio.run turns it into a
    cancellation), and one noted while loading is raised here, before the command starts anything."""
    if signal.getsignal(signal.SIGINT) is _note_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted:
        _interrupted.clear()
        raise KeyboardInterrupt


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(own: list[str], after: list[str]) -> int:
    parser = build_parser(with_check_options=bool(own) and own[0] in ("check", "env") or "-h" in own or "--help" in own)
    if own and own[0] == "run":
        try:
            _check_routing(parser._subparsers._group_actions[0].choices["run"], own[1:])
        except UsageError as e:
            parser.exit(EXIT_USAGE, f"orch: error: {e} (see 'orch run --help')\n")
    args, unknown = parser.parse_known_args(own)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if not unknown:
        _prestart_local_ranks(args)
    if unknown:
        extra = " ".join(unknown)
        if args.command == "run":
            parser.exit(EXIT_USAGE, f"orch: error: a second program or stray argument: {extra}; the program's own "
                                    "arguments go after -- (see 'orch run --help')\n")
        parser._subparsers._group_actions[0].choices[args.command].error(f"unrecognized arguments: {extra}")

    from orchestrator.hostfile import ConfigError

    try:
        if args.command == "run":
            try:
                return cmd_run(args, after)
            except UsageError as e:
                sys.stderr.write(f"orch: error: {e} (see 'orch run --help')\n")
                return EXIT_USAGE
        if args.command == "check":
            from orchestrator.health.check import cmd_check

            interrupts_now()
            return cmd_check(args)
        if args.command == "env":
            from orchestrator.health.env import cmd_env

            interrupts_now()
            return cmd_env(args)
        if args.command == "hostfile":
            from orchestrator.health.hostfile_gen import cmd_hostfile

            interrupts_now()
            return cmd_hostfile(args)
        if args.command == "stage":
            from orchestrator.stage.command import cmd_stage

            interrupts_now()
            return cmd_stage(args)
        if args.command == "report":
            from orchestrator.report import cmd_report

            interrupts_now()
            return cmd_report(args.run_dir)
        if args.command == "runs":
            from orchestrator.report.runs import cmd_runs

            interrupts_now()
            return cmd_runs(args.root, args.limit)
    except ConfigError as e:
        sys.stderr.write(f"orch: error: {e}\n")
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
