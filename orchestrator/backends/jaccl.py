"""JACCL: MLX's RDMA backend over Thunderbolt 5 (``jaccl``: full mesh, ``jaccl-ring``: ring).

What ``mlx.launch`` (``launch_jaccl`` in ``mlx/_distributed_utils/launch.py``)
hands every rank, and so what orch hands it:

* ``MLX_RANK``;
* ``MLX_IBV_DEVICES``: a file holding the hostfile's N x N ``rdma`` matrix as
  JSON (row i: the device rank i uses towards each rank j, null for itself);
* ``MLX_JACCL_COORDINATOR=<rank 0's first ip>:<port>``: the TCP side channel
  over which ranks exchange queue-pair details (rank 0 listens there);
* ``MLX_JACCL_RING=1`` for ``jaccl-ring``.

Its checks, which ``validate`` repeats as one-line errors: the matrix is N x N,
its diagonal null, and every pair the backend uses has a device (``jaccl``:
every pair; ``jaccl-ring``: each host's two ring neighbours, in hostfile order).

The second half of this module reads what a failed JACCL rank leaves behind.
JACCL fails in ways the ring does not: stock MLX skips an RDMA device it cannot
find, and the next step dereferences a null protection domain (a SIGSEGV with
no message, exo#2186); a cable pulled mid-collective segfaults inside the
Thunderbolt RDMA driver (mlx#4192); a dead peer leaves survivors spinning at
100% CPU, ignoring SIGTERM (mlx#3910, #4278). ``classify`` turns the recorded
shapes of these (tests/fixtures/stderr-jaccl/) into a cause a person can act on.
"""

from __future__ import annotations

import json
import re
import signal as _signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

from orchestrator.backends.base import Backend
from orchestrator.backends.nccl import coordinator_ip
from orchestrator.hostfile import ConfigError, Hostfile

if TYPE_CHECKING:
    from orchestrator.backends.base import PlanLike, RankLike

# The summary's warning when orch had to SIGKILL a JACCL rank (survivors of a dead
# peer spin and ignore SIGTERM, so the grace period ends in SIGKILL).
SIGKILL_WARNING = (
    "a JACCL rank was SIGKILLed: on macOS the memory it had registered for RDMA can stay wired until reboot; "
    "if wired memory (vm_stat, Activity Monitor) stays high on that host, reboot it before the next run"
)

# ----------------------------------------------------------------------------- the rdma matrix


def _has_device(dev) -> bool:
    if isinstance(dev, list):
        return any(_has_device(d) for d in dev)
    return bool(dev)


def matrix_problem(hostfile: Hostfile) -> Optional[str]:
    """The first reason the ``rdma`` matrix is not N x N with a null diagonal, or None."""
    n = len(hostfile.hosts)
    for i, h in enumerate(hostfile.hosts):
        if h.slots != 1:
            return (f"hosts[{i}] ({h.name}) has slots {h.slots}; JACCL runs one rank per host "
                    "(the rdma matrix has one row and column per host): drop \"slots\"")
        if len(h.rdma) != n:
            return (f"hosts[{i}] ({h.name}).rdma has {len(h.rdma)} entries; it needs one per host ({n}): "
                    "null for itself, the RDMA device towards each other host")
        if h.rdma[i] is not None:
            return f"hosts[{i}] ({h.name}).rdma[{i}] is {json.dumps(h.rdma[i])}; a host's entry for itself must be null"
    return None


def missing_pairs(hostfile: Hostfile, ring: bool) -> list[tuple[int, int]]:
    """(i, j): host i lists no device towards host j although the backend connects them."""
    hosts = hostfile.hosts
    n = len(hosts)
    out = []
    for i, h in enumerate(hosts):
        peers = ((i - 1) % n, (i + 1) % n) if ring else range(n)
        for j in dict.fromkeys(peers):
            if i != j and not _has_device(h.rdma[j] if j < len(h.rdma) else None):
                out.append((i, j))
    return out


def describe_pairs(hostfile: Hostfile, pairs: list[tuple[int, int]], limit: int = 3) -> str:
    """"mac0 to mac2, mac1 to mac3 and 2 more", as mlx.launch words it."""
    names = [h.name for h in hostfile.hosts]
    text = ", ".join(f"{names[i]} to {names[j]}" for i, j in pairs[:limit])
    if len(pairs) > limit:
        text += f" and {len(pairs) - limit} more"
    return text


def _validate(hostfile: Hostfile, backend: str) -> None:
    """``mlx.launch``'s checks for ``--backend jaccl|jaccl-ring``, each a one-line ``ConfigError``."""
    where = hostfile.path or "<hostfile>"
    if not any(h.rdma for h in hostfile.hosts):
        raise ConfigError(
            f"{where}: the {backend} backend needs an \"rdma\" matrix (per host, the RDMA device towards each other host); "
            "write the hostfile with mlx.distributed_config --backend jaccl or orch hostfile --over thunderbolt, "
            "or use --backend ring"
        )
    problem = matrix_problem(hostfile)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    missing = missing_pairs(hostfile, ring=backend == "jaccl-ring")
    if missing:
        need = "each host and its two ring neighbours" if backend == "jaccl-ring" else "every pair of hosts"
        other = "" if backend == "jaccl-ring" else " (a ring of cables is enough for --backend jaccl-ring)"
        raise ConfigError(
            f"{where}: no RDMA device is listed for {describe_pairs(hostfile, missing)}; {backend} needs one between "
            f"{need}{other}: cable them and regenerate the hostfile, or use --backend ring"
        )
    coordinator_ip(hostfile, backend)


class Jaccl(Backend):
    """JACCL over Thunderbolt 5 RDMA: every pair cabled (``jaccl``) or a ring of cables (``jaccl-ring``)."""

    coordinator = True
    rdma = True

    def __init__(self, name: str) -> None:
        self.name = name

    def validate(self, hostfile: Hostfile) -> None:
        _validate(hostfile, self.name)

    def rank_env(self, plan: "PlanLike", rank: "RankLike") -> dict[str, str]:
        env = {"MLX_JACCL_COORDINATOR": plan.coordinator or ""}
        if self.name == "jaccl-ring":
            env["MLX_JACCL_RING"] = "1"
        return env

    def files(self, plan: "PlanLike") -> dict[str, str]:
        """``MLX_IBV_DEVICES``: the matrix exactly as mlx.launch serialises it (``json.dumps`` of the rows)."""
        return {"MLX_IBV_DEVICES": json.dumps(plan.rdma)}

    def classify(self, lines, rank=0, plan=None, signal=None, initialised=None):
        return classify(lines, rank, plan, signal=signal, initialised=initialised)

    @property
    def init_failures(self) -> frozenset:
        return INIT_FAILURES

    def kill_warning(self) -> Optional[str]:
        return SIGKILL_WARNING


# ----------------------------------------------------------------------------- failures


@dataclass
class JacclFailure:
    """Field-compatible with ``orchestrator.diagnose.Diagnosis`` (cause, message, secondary), plus

    ``during_init``: JACCL never came up on this host (RDMA off, device missing,
    link down) -- the failures ``--fallback-backend ring`` may restart from.
    """

    cause: str
    message: str
    secondary: bool = False
    during_init: bool = False


# Causes that mean "JACCL could not start here": a restart over the ring can work.
INIT_FAILURES = frozenset({
    "jaccl_rdma_disabled", "jaccl_device_missing", "jaccl_no_protection_domain", "jaccl_queue_pair",
    "jaccl_no_gid", "jaccl_queue_pairs_exhausted", "jaccl_coordinator_unreachable",
})

_RDMA_ENABLE = "enable RDMA with `rdma_ctl enable` from macOS Recovery, reboot, and check with `rdma_ctl status` and `ibv_devices`"


def _host(rank: int, plan) -> str:
    ranks = getattr(plan, "ranks", None) or []
    return f"rank {rank} on {ranks[rank].host}" if rank < len(ranks) else f"rank {rank}"


def _devices_of(rank: int, plan) -> str:
    rdma = getattr(plan, "rdma", None)
    if not rdma or rank >= len(rdma):
        return ""
    names = sorted({d for dev in rdma[rank] for d in (dev if isinstance(dev, list) else [dev]) if d})
    return f" (its hostfile row names {', '.join(names)})" if names else ""


def classify(lines: Iterable[str], rank: int = 0, plan=None, signal: Optional[int] = None,
             initialised: Optional[bool] = None) -> Optional[JacclFailure]:
    """What a failed JACCL rank's stderr (and exit signal) says, most specific first; None if nothing JACCL-shaped.

    ``signal``: the signal that ended the rank, if any; ``initialised``: whether
    it got past ``mx.distributed.init`` (the supervisor's ``ready`` event) -- a
    silent SIGSEGV means "RDMA device missing" before that and "link lost" after.
    """
    text = "\n".join(lines)
    who = _host(rank, plan)

    m = re.search(r"\[jaccl\] Could not find device (\S+) \((\d+) available\)", text)
    if m:
        dev, avail = m.group(1), int(m.group(2))
        why = (f"no RDMA device at all on that host: RDMA is not enabled; {_RDMA_ENABLE}" if avail == 0 else
               f"{avail} other RDMA devices exist: the cable on that port is unplugged or the hostfile names the wrong "
               "port; `ibv_devices` lists them (orch check verifies every host)")
        return JacclFailure("jaccl_device_missing", f"jaccl: device {dev} missing on {who} ({why})", during_init=True)
    m = re.search(r"\[ERROR\] (\S+) does not seem to have RDMA enabled", text)
    if m:
        return JacclFailure("jaccl_rdma_disabled", f"jaccl: RDMA not enabled on {m.group(1)}: {_RDMA_ENABLE}",
                            during_init=True)
    if re.search(r"register_to_protection_domain|ibv_reg_mr", text) and re.search(r"SIGSEGV|Segmentation fault", text):
        return JacclFailure(
            "jaccl_rdma_disabled",
            f"jaccl: RDMA not enabled or a device missing on {who}{_devices_of(rank, plan)}: MLX skipped a device "
            f"it could not find and crashed registering memory without it (SIGSEGV, exo#2186); {_RDMA_ENABLE}",
            during_init=True)
    if re.search(r"tbt_post_(recv|send)|Connection::post_(recv|send)", text) and re.search(r"SIGSEGV|Segmentation fault", text):
        return JacclFailure(
            "jaccl_link_lost",
            f"jaccl: {who} crashed (SIGSEGV in the Thunderbolt RDMA driver during a collective): a Thunderbolt cable "
            "was unplugged or a link went down mid-collective (mlx#4192); check the cables, then restart")
    m = re.search(r"\[jaccl\] Creating the queue pair failed with (?:'[^']*\((\d+)\)'|errno (\d+))", text)
    if m and (m.group(1) or m.group(2)) == "16":
        return JacclFailure(
            "jaccl_queue_pairs_exhausted",
            f"jaccl: {who} ran out of RDMA queue pairs on a Thunderbolt device (EBUSY): each device supports only a few; "
            "a stale or SIGKILLed JACCL process may still hold them (reboot that host), or too many ranks share a device",
            during_init=True)
    if re.search(r"\[jaccl\] No IPv4-mapped GID", text):
        return JacclFailure(
            "jaccl_no_gid",
            f"jaccl: {who}: a Thunderbolt RDMA port has no IPv4 address, so it publishes no usable GID; give the "
            "interface an address (e.g. a 169.254.x.x link-local alias) as mlx.distributed_config --auto-setup does",
            during_init=True)
    m = re.search(r"\[jaccl\] Changing queue pair to (INIT|RTR|RTS) failed with errno (\d+)", text)
    if m:
        state, err = m.group(1), int(m.group(2))
        hint = {
            22: "invalid address for this link: usually the Thunderbolt port has no IPv4 address, so no IPv4-mapped "
                "GID (mlx#3467); give each RDMA interface an address, or check that the hostfile's rdma row names "
                "the port the cable to that peer is in",
            60: "peer unreachable on this link: wrong cable or device in the hostfile, or the peer's address is gone",
        }.get(err, "the RDMA link between the two hosts is not usable")
        return JacclFailure("jaccl_queue_pair",
                            f"jaccl: {who} could not bring a queue pair to {state} (errno {err}): {hint}",
                            during_init=True)
    if re.search(r"\[jaccl\] Couldn't allocate protection domain", text):
        return JacclFailure(
            "jaccl_no_protection_domain",
            f"jaccl: {who} could not allocate an RDMA protection domain{_devices_of(rank, plan)}: the Thunderbolt "
            "link of that device is down or RDMA is not ready; check the cable and `ibv_devinfo`",
            during_init=True)
    m = re.search(r"\[jaccl\] Couldn't connect \(error: (\d+)\)", text)
    if m:
        where = getattr(plan, "coordinator", None) or "MLX_JACCL_COORDINATOR"
        return JacclFailure(
            "jaccl_coordinator_unreachable",
            f"jaccl: {who} could not reach the coordinator (rank 0) at {where} (error {m.group(1)}); rank 0's first "
            "address in the hostfile must be reachable from every host", during_init=True)
    m = re.search(r"\[jaccl\] (Recv|Send) failed with errno=(\d+)", text)
    if m:
        return JacclFailure(
            "jaccl_peer_lost",
            f"jaccl: {who}: the side channel to a peer failed ({m.group(1).lower()} errno {m.group(2)}): another rank "
            "died or its host dropped off the network", secondary=True)
    # A bare segfault says "JACCL" only when the job ran on JACCL (any rank can segfault for other reasons).
    on_jaccl = getattr(plan, "backend", None) in ("jaccl", "jaccl-ring")
    if on_jaccl and (signal == _signal.SIGSEGV or re.search(r"Fatal Python error: Segmentation fault", text)):
        if initialised is False:
            return JacclFailure(
                "jaccl_rdma_disabled",
                f"jaccl: {who} crashed (SIGSEGV) while JACCL was starting{_devices_of(rank, plan)}: stock MLX does "
                f"this when a listed RDMA device does not exist (exo#2186); {_RDMA_ENABLE}", during_init=True)
        return JacclFailure(
            "jaccl_segfault",
            f"jaccl: {who} crashed (SIGSEGV) inside a JACCL collective: a Thunderbolt cable pulled or a link lost "
            "mid-collective does this (mlx#4192); check the cables, then restart")
    return None


BACKENDS = {"jaccl": Jaccl("jaccl"), "jaccl-ring": Jaccl("jaccl-ring")}
