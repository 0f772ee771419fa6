"""Hostfiles: what users already have, validated with errors a person can act on.

Accepted shapes (all normalised into one ``Hostfile`` model):

* MLX's own format, as written by ``mlx.distributed_config``::

      {"backend": "ring", "envs": ["K=V"], "hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"], "rdma": []}]}

  or a bare list of such hosts.
* The plain form ``{"hosts": [{"hostname": "mac1", "local_ip": "10.0.0.1"}]}``.
* Per host, optionally: ``slots`` (ranks on that host, default 1), ``user``,
  ``port`` (SSH port), ``python``, ``cwd``, ``env`` (mapping), and ``links``
  (Thunderbolt cables, as written by ``orch hostfile --over thunderbolt``).
  ``memory_gb`` (what a run may use there; its ranks' memory plans read it).

``ips`` keep MLX's meaning (the addresses this host's rank listens on; several
mean several connections). An entry may carry a prefix length
(``"10.0.1.2/30"``): a host whose addresses have prefixes is on point-to-point
links, and the planner picks the one on the link to its left neighbour (see
``plan.py``).

Every problem becomes a ``ConfigError`` whose message is one line naming the
file, the host index, the field and the fix. That includes files that are not
hostfiles at all: a FIFO or device is refused from ``stat`` before it is opened
(and opened non-blocking besides, so ``orch`` can never hang on one), binary or
UTF-16 content, JSON nested deeper than Python can parse, integers past
Python's digit limit, and IPv6 addresses, which MLX's ring backend cannot parse.
``orch run`` and ``orch check`` both go through :func:`load_hostfile`, so they
accept and refuse the same files.
"""

from __future__ import annotations

import codecs
import ipaddress
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any, Optional

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.backends.names import NAMES as BACKENDS  # the one list of backends
from orchestrator.protocol import MEMORY_BUDGET_ENV
from orchestrator.schema import Model

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "localhost.localdomain"}
# Hostfiles are small; anything bigger is the wrong file, and reading it whole would cost memory for nothing.
MAX_HOSTFILE_BYTES = 4 * 1024 * 1024
# Ranks on one host / in one job: far beyond any real cluster of Macs, but small enough that a typo
# ("slots": 100000, -n 100000) is refused instead of starting a fork bomb.
MAX_SLOTS = 1024
MAX_WORLD_SIZE = 65536


class ConfigError(Exception):
    """A user mistake in a hostfile or on the command line: one line, exit 2."""


def _show(value: Any, limit: int = 40) -> str:
    """A value for an error line: its repr, cut short (the line must stay one readable line)."""
    try:  # text as Python quotes it ('10.0.0.300'), everything else as JSON (true, null, [1])
        text = ascii(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_ipv4(ip: str) -> str:
    """An address MLX's ring can use: IPv4, optionally with a prefix length."""
    try:
        iface = ipaddress.ip_interface(ip)
    except ValueError:
        raise ValueError(f"{_show(ip)} is not an IP address (use e.g. \"10.0.0.2\" or \"10.0.0.2/30\")") from None
    if iface.version != 4:
        raise ValueError(f"{_show(ip)} is an IPv6 address, which MLX's ring backend cannot parse "
                         "(use this host's IPv4 address, e.g. \"10.0.0.2\")")
    return ip


class Link(Model):
    model_config = ConfigDict(extra="forbid")
    peer: str
    iface: Optional[str] = None
    ip: str

    @field_validator("ip")
    @classmethod
    def _check_ip(cls, ip: str) -> str:
        return _check_ipv4(ip)


class Host(Model):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    ips: list[str] = Field(default_factory=list)
    rdma: list[Any] = Field(default_factory=list)
    slots: int = Field(1, strict=True)  # strict: JSON true is not 1 rank
    user: Optional[str] = None
    port: Optional[int] = Field(None, strict=True)
    python: Optional[str] = None
    cwd: Optional[str] = None
    env: dict[str, str] = Field(default_factory=dict)
    links: list[Link] = Field(default_factory=list)
    # The memory a run may use on this host (mixed Macs: a 16 GB one next to a 192 GB one). Its ranks share it,
    # and each gets its part as ORCH_MEMORY_BUDGET_BYTES: the runtime's memory plan (runtime/memfit.py) reads it.
    memory_gb: Optional[float] = None

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
            ips = data.get("ips", [])
            if not isinstance(ips, list):
                raise ValueError(f"ips: expected a list of addresses like [\"10.0.0.1\"], got {_show(ips)}")
            data["ips"] = [ip] + [i for i in ips if i != ip]
        if "name" not in data:
            import difflib

            close = [k for k in data if isinstance(k, str) and difflib.get_close_matches(k, ["ssh", "hostname"], n=1)]
            typo = f" (is '{close[0]}' a misspelling of it?)" if close else ""
            raise ValueError(f"missing 'ssh' (or 'hostname'): the name to reach this host by{typo}")
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        """One word: a name with a space or a control character reaches no host, and would break every line
        that names it (ssh's command line, orch's messages)."""
        if any(c.isspace() or not c.isprintable() for c in name):
            raise ValueError(f"{_show(name)} is not a host name (it contains a space or a control character)")
        return name

    @field_validator("ips")
    @classmethod
    def _check_ips(cls, ips: list[str]) -> list[str]:
        for ip in ips:
            _check_ipv4(ip)
        return ips

    @field_validator("rdma")
    @classmethod
    def _check_rdma(cls, rdma: list[Any]) -> list[Any]:
        """One entry per host: null (itself / no cable), "rdma_en3", or a list of device names."""
        for j, dev in enumerate(rdma):
            ok = dev is None or isinstance(dev, str) or (isinstance(dev, list) and all(isinstance(d, str) for d in dev))
            if not ok:
                raise ValueError(
                    f"entry [{j}] is {json.dumps(dev)}; each entry is null, an RDMA device name like \"rdma_en3\", "
                    "or a list of names (one row per host, as mlx.distributed_config writes it)"
                )
        return rdma

    @field_validator("slots")
    @classmethod
    def _check_slots(cls, slots: int) -> int:
        if slots < 1:
            raise ValueError(f"slots is {slots}; it must be at least 1 (ranks on this host)")
        if slots > MAX_SLOTS:
            raise ValueError(f"slots is {slots}; at most {MAX_SLOTS} ranks per host")
        return slots

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            parse_env_assignment(f"{key}={value}")
        return env

    @field_validator("memory_gb")
    @classmethod
    def _check_memory_gb(cls, gb: Optional[float]) -> Optional[float]:
        if gb is not None and not (0 < gb < 1e6):
            raise ValueError(f"memory_gb is {gb}; give the memory this host may use in GB, e.g. 16")
        return gb

    @model_validator(mode="after")
    def _memory_budget_env(self) -> "Host":
        if self.memory_gb is not None:
            self.env.setdefault(MEMORY_BUDGET_ENV, str(int(self.memory_gb * 2**30 / self.slots)))
        return self

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


class Hostfile(Model):
    model_config = ConfigDict(extra="forbid")

    backend: Optional[str] = None  # one of backends.NAMES (checked below, in one line)
    envs: list[str] = Field(default_factory=list)
    hosts: list[Host] = Field(min_length=1)
    path: Optional[str] = None

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, backend: Any) -> Any:
        if backend in ("", None):
            return None
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not supported; use one of " + ", ".join(f'"{b}"' for b in BACKENDS))
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
        if self.world_size > MAX_WORLD_SIZE:
            raise ValueError(f"hosts: {self.world_size} ranks in all; orch runs at most {MAX_WORLD_SIZE}")
        return self

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def env(self) -> dict[str, str]:
        return dict(parse_env_assignment(e) for e in self.envs)


def parse_env_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if (not sep or not key or not (key[0].isascii() and (key[0].isalpha() or key[0] == "_"))
            or not all(c.isascii() and (c.isalnum() or c == "_") for c in key)):
        raise ValueError(f"{_show(text)} is not an environment assignment; write it as NAME=value")
    return key, value


def _name(part: Any) -> str:
    """A field name for an error line: as written when it is short and printable, else quoted and cut."""
    text = str(part)
    return text if text.isprintable() and 0 < len(text) <= 40 else _show(text)


def _format_loc(loc: tuple) -> str:
    parts = [p for p in loc if not (isinstance(p, str) and p.startswith(("function-", "model")))]
    if len(parts) == 3 and parts[0] == "hosts" and isinstance(parts[1], int) and parts[2] == "name":
        parts[2] = "ssh"  # a host's "name" is what the file calls "ssh" (or "hostname")
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + _name(part)
    return out


_KINDS = {"int": "a whole number", "string": "text", "list": "a list", "dict": "an object", "bool": "true or false",
          "float": "a number", "model": "an object", "literal": "one of the listed values"}


def _validation_message(path: str, err: ValidationError) -> str:
    first = err.errors(include_url=False)[0]
    loc = _format_loc(first["loc"])
    msg = " ".join(str(first["msg"]).split())
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    kind = str(first["type"]).split("_")[0]
    if first["type"].endswith(("_type", "_parsing", "_from_float")) and kind in _KINDS:
        msg = f"expected {_KINDS[kind]}, got {_show(first.get('input'))}"
    elif first["type"] == "missing":
        msg = f"missing required field '{first['loc'][-1]}'"
    elif first["type"] == "too_short" and loc.endswith("hosts"):
        msg = "the host list is empty; list at least one host"
    elif first["type"] == "extra_forbidden":
        msg = (
            f"unknown field '{_name(first['loc'][-1])}'; known host fields are ssh/hostname, ips/local_ip, rdma, "
            "slots, user, port, python, cwd, env, links, memory_gb"
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
    _refuse_nul(data, path)
    try:
        return Hostfile.model_validate({**data, "path": path})
    except ValidationError as err:
        raise ConfigError(_validation_message(path, err)) from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply; a hostfile is a few levels deep") from None


def _refuse_nul(data: Any, path: str) -> None:
    """A NUL in any text would only fail later, at exec or SSH time, with a traceback: refuse it here.

    Iterative, so deeply nested input cannot exhaust the stack.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                here = f"{loc}.{_name(k)}" if loc else _name(k)
                if isinstance(k, str) and "\0" in k:
                    raise ConfigError(f"{path}: {here}: the field name contains a NUL character; remove it")
                stack.append((here, v))
        elif isinstance(value, list):
            stack.extend((f"{loc}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str) and "\0" in value:
            raise ConfigError(f"{path}: {loc}: {_show(value)} contains a NUL character; remove it")


def _read_regular_file(p: Path) -> bytes:
    """The bytes of ``p``, refusing anything but a small regular file without ever blocking.

    ``stat`` first so a FIFO, socket or device is never opened; ``O_NONBLOCK``
    besides, in case the path is swapped for a FIFO between the two calls (then
    ``fstat`` refuses it).
    """
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{p}: no such hostfile; check the path given to --hostfile") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot read hostfile ({getattr(e, 'strerror', None) or e})") from None
    _check_mode(p, st)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read hostfile ({e.strerror})") from None
    try:
        _check_mode(p, os.fstat(fd))
        chunks, size = [], 0
        while size <= MAX_HOSTFILE_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read hostfile ({e.strerror})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_HOSTFILE_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_HOSTFILE_BYTES // (1024 * 1024)} MiB; "
                          "a hostfile is a small JSON file (is this the right file?)")
    return data


def _check_mode(p: Path, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{p}: is a directory; give the path of the JSON hostfile")
    if not stat.S_ISREG(st.st_mode):
        what = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise ConfigError(f"{p}: is {what}; give a regular JSON file (write the hostfile to a file first)")
    if st.st_size > MAX_HOSTFILE_BYTES:
        raise ConfigError(f"{p}: {st.st_size} bytes, larger than {MAX_HOSTFILE_BYTES // (1024 * 1024)} MiB; "
                          "a hostfile is a small JSON file (is this the right file?)")


def _decode(p: Path, data: bytes) -> str:
    """UTF-8 text (a leading BOM, as some Windows editors write, is accepted); anything else is one clear line."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (
            len(data) >= 2 and b"\0" in data[:4] and (data[0] == 0) != (data[1] == 0)):
        raise ConfigError(f"{p}: is UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 {p.name})")
    if b"\0" in data:
        raise ConfigError(f"{p}: byte {data.index(0)}: a NUL byte, so this is binary, not JSON text; "
                          "give the JSON hostfile")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: byte {e.start}: 0x{data[e.start]:02x} is not UTF-8 text; "
                          "a hostfile is UTF-8 JSON (is this the right file?)") from None


def load_hostfile(path: str | os.PathLike) -> Hostfile:
    """Read, decode, parse and validate a hostfile; every problem is one ``ConfigError`` line."""
    p = Path(path)
    text = _decode(p, _read_regular_file(p))
    if not text.strip():
        raise ConfigError(f"{p}: the file is empty; a hostfile is JSON like "
                          '{"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}]} (orch hostfile writes one)')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg}); fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{p}: JSON nested too deeply; a hostfile is a few levels deep (is this the right file?)") from None
    except ValueError:  # e.g. an integer longer than Python's int-conversion limit (4300 digits)
        raise ConfigError(f"{p}: a number too long to read (thousands of digits); no hostfile field needs one") from None
    return parse_hostfile(data, str(p))


def local_hostfile(n: int) -> Hostfile:
    """The cluster behind ``-n N``: N ranks on this machine over loopback."""
    if n < 1:
        raise ConfigError(f"-n {n}: the number of ranks must be at least 1")
    if n > MAX_SLOTS:
        raise ConfigError(f"-n {n}: at most {MAX_SLOTS} local ranks (use a hostfile to spread ranks over machines)")
    # Built without validating (values known good; tests/test_hostfile.py checks validation agrees): validating
    # would build the hostfile models' validators, ~20 ms of every `-n N` launch before its ranks get going.
    return Hostfile.model_construct(hosts=[Host.model_construct(name="localhost", ips=["127.0.0.1"], slots=n)],
                                    path=f"-n {n}")


def hosts_hostfile(names: str, per_host: int = 1) -> Hostfile:
    """``--hosts mac1,mac2`` (mlx.launch's shortcut): each name an SSH host, ``per_host`` ranks on each.

    mlx.launch takes an address only from names that are IP addresses; we also
    resolve host names (IPv4, as the ring needs), so ``--hosts mac1,mac2`` works
    for the ring without a hostfile.
    """

    where = f"--hosts {names}"
    parts = [p.strip() for p in names.split(",")]
    if not names.strip() or any(not p for p in parts):
        raise ConfigError(f"{where}: an empty host name; give comma-separated names like mac1,mac2")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"{where}: a host is named twice; use -n K for K ranks on each host")
    if not 1 <= per_host <= MAX_SLOTS:
        raise ConfigError(f"{where}: -n {per_host}: ranks per host must be 1..{MAX_SLOTS}")
    hosts = []
    for name in parts:
        try:
            ip = str(ipaddress.IPv4Address(name))
        except ValueError:
            try:
                ip = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            except (OSError, UnicodeError) as e:
                raise ConfigError(f"{where}: cannot resolve {name!r} to an IPv4 address ({e}); "
                                  "use a hostfile with its \"ips\"") from None
        hosts.append(Host(name=name, ips=[ip], slots=per_host))
    return Hostfile(hosts=hosts, path=where)


def select_hosts(hostfile: Hostfile, include: Optional[str], exclude: Optional[str]) -> Hostfile:
    """``--include`` / ``--exclude`` host names for one run (DeepSpeed's flags); unknown names are errors."""
    if not include and not exclude:
        return hostfile
    names = [h.name for h in hostfile.hosts]
    wanted = [n.strip() for n in include.split(",")] if include else names
    dropped = {n.strip() for n in exclude.split(",")} if exclude else set()
    for flag, given in (("--include", wanted if include else []), ("--exclude", dropped)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise ConfigError(f"{hostfile.path or '<hostfile>'}: {flag}: no host named {', '.join(map(repr, unknown))} "
                              f"(hosts: {', '.join(names)})")
    kept = [h for h in hostfile.hosts if h.name in wanted and h.name not in dropped]
    if not kept:
        raise ConfigError(f"{hostfile.path or '<hostfile>'}: --include/--exclude leave no host to run on")
    return hostfile.model_copy(update={"hosts": kept})
