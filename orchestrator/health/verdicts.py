"""``orch check``'s results and how they are shown: the host x check table, the link rows, JSON.

Plain dataclasses filled in by the checks (``hosts.py``, ``links.py``, ``jaccl_checks.py``,
``collective.py``); ``render`` is the one place that knows what a person sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MARK = {"pass": "✓", "warn": "!", "fail": "✗", "skip": "–"}
CHECK_ORDER = ("ssh", "python", "mlx", "mpi", "metal", "disk", "memory", "clock", "ports",
               "macos", "rdma", "thunderbolt", "bridge")

# ----------------------------------------------------------------------------- results


@dataclass
class Check:
    name: str
    status: str  # pass, warn, fail, skip (not checked because something before it failed)
    detail: str
    short: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "warn")

    def as_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "status": self.status, "detail": self.detail}


@dataclass
class HostResult:
    index: int
    host: str
    local: bool
    checks: dict[str, Check] = field(default_factory=dict)

    def add(self, name: str, status: str, detail: str, short: str = "") -> Check:
        c = self.checks[name] = Check(name, status, detail, short or detail)
        return c

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def as_json(self) -> dict:
        ordered = sorted(self.checks.values(), key=lambda c: CHECK_ORDER.index(c.name) if c.name in CHECK_ORDER else 99)
        return {"host": self.host, "index": self.index, "local": self.local, "ok": self.ok,
                "checks": [c.as_json() for c in ordered]}


@dataclass
class LinkResult:
    from_rank: int
    to_rank: int
    from_host: str
    to_host: str
    address: str
    status: str
    detail: str
    short: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "warn")

    def as_json(self) -> dict:
        return {"from": self.from_host, "to": self.to_host, "address": self.address, "ok": self.ok,
                "status": self.status, "detail": self.detail, "from_rank": self.from_rank, "to_rank": self.to_rank}


@dataclass
class Report:
    backend: str
    world_size: int
    hosts: list[HostResult]
    links: list[LinkResult] = field(default_factory=list)
    collective: Optional[dict] = None
    link_bandwidth: Optional[dict] = None  # --link-bandwidth: {"detail", "matrix": LinkMatrix, "ring": RingChoice}
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (all(h.ok for h in self.hosts) and all(l.ok for l in self.links)
                and (self.collective is None or bool(self.collective.get("ok"))))

    def as_json(self) -> dict:
        return {"ok": self.ok, "backend": self.backend, "world_size": self.world_size,
                "hosts": [h.as_json() for h in self.hosts], "links": [l.as_json() for l in self.links],
                "collective": self.collective, "seconds": round(self.seconds, 3),
                **({"link_bandwidth": self.link_bandwidth} if self.link_bandwidth is not None else {})}


def _bandwidth_lines(lb: dict) -> list[str]:
    from orchestrator.plan.ringorder import LinkMatrix, fmt_gbit

    lines = []
    if lb.get("matrix"):
        m = LinkMatrix.model_validate(lb["matrix"])
        for p in m.paths:
            a, b = m.hosts[p.a], m.hosts[p.b]
            if p.error or p.a_to_b_gbit_s is None or p.b_to_a_gbit_s is None:
                lines.append(f"  ✗ {a} <-> {b}  {p.ip_a} / {p.ip_b}  {p.error or 'not measured'}")
            else:
                lines.append(f"  {a} <-> {b}  {p.ip_a} / {p.ip_b}  {fmt_gbit(p.a_to_b_gbit_s)} / {fmt_gbit(p.b_to_a_gbit_s)}")
    lines.append(f"  {lb.get('detail', '')}")
    return lines


def render(report: Report) -> str:
    """Host x check table (✓ pass, ! warning, ✗ fail, – not checked), one row per link, then every problem in full."""
    names = [n for n in CHECK_ORDER if any(n in h.checks for h in report.hosts)]
    rows = [["host"] + names]
    for h in report.hosts:
        row = [h.host]
        for n in names:
            c = h.checks.get(n)
            row.append("" if c is None else MARK[c.status] if c.status == "skip" else f"{MARK[c.status]} {c.short}".strip())
        rows.append(row)
    widths = [min(28, max(len(r[k]) for r in rows)) for k in range(len(rows[0]))]
    lines = [f"orch check: {len(report.hosts)} host{'s' if len(report.hosts) != 1 else ''}, {report.world_size} "
             f"rank{'s' if report.world_size != 1 else ''}, {report.backend} backend", ""]
    for r in rows:
        lines.append("  ".join(cell[:28].ljust(w) for cell, w in zip(r, widths)).rstrip())
    if report.links:
        lines += ["", "ring links (rank i -> rank i+1, tested from rank i's host to the address rank i+1 will listen on)"]
        for l in report.links:
            lines.append(f"{MARK[l.status]} rank {l.from_rank} {l.from_host} -> rank {l.to_rank} {l.to_host}  {l.address}  "
                         f"{l.short}")
    if report.collective is not None:
        c = report.collective
        lines += ["", f"{MARK['pass' if c.get('ok') else 'fail']} collective: {c.get('detail')}"]
    if report.link_bandwidth is not None:
        lines += ["", "link bandwidth (each way; the ring all_sum runs at its slowest link)"]
        lines += _bandwidth_lines(report.link_bandwidth)
    problems = [(h.host, c) for h in report.hosts for c in h.checks.values() if c.status in ("fail", "warn")]
    failed_links = [l for l in report.links if not l.ok]
    if problems or failed_links:
        lines += ["", "problems:"]
        for host, c in problems:
            lines.append(f"  {MARK[c.status]} {host} {c.name}: {c.detail}")
        for l in failed_links:
            lines.append(f"  {MARK[l.status]} link rank {l.from_rank} {l.from_host} -> rank {l.to_rank} {l.to_host} "
                         f"({l.address}): {l.detail}")
    n_fail = sum(1 for h in report.hosts for c in h.checks.values() if c.status == "fail") + len(failed_links) + (
        0 if report.collective is None or report.collective.get("ok") else 1)
    lines += ["", f"orch check: {'all checks passed' if report.ok else f'FAILED ({n_fail} failing)'} "
                  f"in {report.seconds:.1f}s"]
    return "\n".join(lines) + "\n"

