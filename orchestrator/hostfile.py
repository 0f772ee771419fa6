"""Hostfiles: what users already have, validated with errors a person can act on.

Accepted shapes (all normalised into one ``Hostfile`` model):

* MLX's own format, as written by ``mlx.distributed_config``::

      {"backend": "ring", "envs": ["K=V"], "hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"], "rdma": []}]}

  or a bare list of such hosts.
* The plain form ``{"hosts": [{"hostname": "mac1", "local_ip": "10.0.0.1"}]}``.
* Per host, optionally: ``slots`` (ranks on that host, default 1), ``user``,
  ``port`` (SSH port), ``python``, ``cwd``, ``env`` (mapping), and ``links``
  (Thunderbolt cables, as written by ``orch hostfile --over thunderbolt``).

``ips`` keep MLX's meaning (the addresses this host's rank listens on; several
mean several connections). An entry may carry a prefix length
(``"10.0.1.2/30"``): a host whose addresses have prefixes is on point-to-point
links, and the planner picks the one on the link to its left neighbour (see
``plan.py``).

Every problem becomes a ``ConfigError`` whose message is one line naming the
file, the host index, the field and the fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BACKENDS = ("ring", "mpi")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "localhost.localdomain"}


class ConfigError(Exception):
    """A user mistake in a hostfile or on the command line: one line, exit 2."""


class Link(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peer: str
    iface: Optional[str] = None
    ip: str


class Host(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    ips: list[str] = Field(default_factory=list)
    rdma: list[Any] = Field(default_factory=list)
    slots: int = 1
    user: Optional[str] = None
    port: Optional[int] = None
    python: Optional[str] = None
    cwd: Optional[str] = None
    env: dict[str, str] = Field(default_factory=dict)
    links: list[Link] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if not isinstance(data, dict):
            raise ValueError("each host must be an object like {\"ssh\": \"mac1\", \"ips\": [\"10.0.0.1\"]}")
        data = dict(data)
        if "ssh" in data:
            data["name"] = data.pop("ssh")
        if "hostname" in data:
            if "name" in data:
                raise ValueError("give either 'ssh' or 'hostname', not both")
            data["name"] = data.pop("hostname")
        if "local_ip" in data:
            ip = data.pop("local_ip")
            data["ips"] = [ip] + [i for i in data.get("ips", []) if i != ip]
        if "name" not in data:
            raise ValueError("missing 'ssh' (or 'hostname'): the name to reach this host by")
        return data

    @field_validator("ips")
    @classmethod
    def _check_ips(cls, ips: list[str]) -> list[str]:
        for ip in ips:
            try:
                ipaddress.ip_interface(ip)
            except ValueError:
                raise ValueError(f"{ip!r} is not an IP address (use e.g. \"10.0.0.2\" or \"10.0.0.2/30\")") from None
        return ips

    @field_validator("slots")
    @classmethod
    def _check_slots(cls, slots: int) -> int:
        if slots < 1:
            raise ValueError(f"slots is {slots}; it must be at least 1 (ranks on this host)")
        return slots

    @field_validator("port")
    @classmethod
    def _check_port(cls, port: Optional[int]) -> Optional[int]:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range 1-65535")
        return port

    @property
    def bare_ips(self) -> list[str]:
        """The addresses without prefix lengths."""
        return [str(ipaddress.ip_interface(ip).ip) for ip in self.ips]

    @property
    def is_local(self) -> bool:
        """True when the rank runs on this machine without SSH."""
        if self.user or self.port:
            return False
        if self.name in LOCAL_NAMES:
            return True
        return self.name == socket.gethostname() and all(ipaddress.ip_address(i).is_loopback for i in self.bare_ips)


class Hostfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Optional[Literal["ring", "mpi"]] = None
    envs: list[str] = Field(default_factory=list)
    hosts: list[Host] = Field(min_length=1)
    path: Optional[str] = None

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, backend: Any) -> Any:
        if backend in ("", None):
            return None
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not supported; use \"ring\" or \"mpi\"")
        return backend

    @field_validator("envs")
    @classmethod
    def _check_envs(cls, envs: list[str]) -> list[str]:
        for e in envs:
            parse_env_assignment(e)
        return envs

    @model_validator(mode="after")
    def _unique_addresses(self) -> "Hostfile":
        seen: dict[str, int] = {}
        for i, h in enumerate(self.hosts):
            for ip in h.bare_ips:
                if ip in seen and seen[ip] != i and not ipaddress.ip_address(ip).is_loopback:
                    raise ValueError(
                        f"hosts[{i}].ips: address {ip} is also listed by hosts[{seen[ip]}]; "
                        "each rank needs its own address (or use \"slots\" for several ranks on one host)"
                    )
                seen[ip] = i
        return self

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def env(self) -> dict[str, str]:
        return dict(parse_env_assignment(e) for e in self.envs)


def parse_env_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
        raise ValueError(f"{text!r} is not an environment assignment; write it as NAME=value")
    return key, value


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_check_ips()]",) or str(part).startswith(("function-", "model")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _validation_message(path: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = _format_loc(first["loc"])
    msg = first["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if first["type"] == "missing":
        msg = f"missing required field '{first['loc'][-1]}'"
    elif first["type"] == "too_short" and loc.endswith("hosts"):
        msg = "the host list is empty; list at least one host"
    elif first["type"] == "extra_forbidden":
        msg = (
            f"unknown field '{first['loc'][-1]}'; known host fields are ssh/hostname, ips/local_ip, rdma, "
            "slots, user, port, python, cwd, env, links"
        )
    where = f"{path}: {loc}: " if loc else f"{path}: "
    return where + msg


def parse_hostfile(data: Any, path: str = "<hostfile>") -> Hostfile:
    """Validate already-decoded JSON; raises ``ConfigError`` with one line."""
    if isinstance(data, list):
        data = {"hosts": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with \"hosts\" (or a list of hosts), got {type(data).__name__}")
    if "hosts" not in data:
        raise ConfigError(f"{path}: missing required field 'hosts'; add \"hosts\": [{{\"ssh\": \"name\", \"ips\": [\"10.0.0.1\"]}}]")
    try:
        return Hostfile.model_validate({**data, "path": path})
    except ValidationError as err:
        raise ConfigError(_validation_message(path, err)) from None


def load_hostfile(path: str | os.PathLike) -> Hostfile:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such hostfile; check the path given to --hostfile") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read hostfile ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg}); fix the syntax") from None
    return parse_hostfile(data, str(p))


def local_hostfile(n: int) -> Hostfile:
    """The cluster behind ``-n N``: N ranks on this machine over loopback."""
    if n < 1:
        raise ConfigError(f"-n {n}: the number of ranks must be at least 1")
    return Hostfile(hosts=[Host(name="localhost", ips=["127.0.0.1"], slots=n)], path=f"-n {n}")
