"""What ``orch check`` was asked to do: its own module, so the checks and the collective probe
(``health/collective.py``, which ``check.py`` runs) both read it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from orchestrator.remote.ssh import SSHOptions


@dataclass
class CheckOptions:
    hostfile: Optional[str] = None
    n: Optional[int] = None
    backend: Optional[str] = None
    python: Optional[str] = None
    collective: bool = False
    collective_mib: float = 64.0
    link_bandwidth: bool = False  # measure every link between the hosts and name the fastest ring (linkbw.py)
    json_output: bool = False
    ssh: Optional["SSHOptions"] = None  # how to reach the hosts (remote/ssh.py); None: the defaults, --timeout to connect
    timeout: float = 15.0
    starting_port: Optional[int] = None
    mpirun: Optional[str] = None

    def __post_init__(self) -> None:
        if self.ssh is None:
            from orchestrator.remote.ssh import SSHOptions

            self.ssh = SSHOptions(connect_timeout=self.timeout)

    @property
    def connect_timeout(self) -> float:
        """How long one TCP connect on a link may take (a dropped SYN waits this long)."""
        return max(1.0, min(5.0, self.timeout / 3))
