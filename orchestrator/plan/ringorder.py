"""The fastest ring: order the hosts so that the slowest link of the ring is as fast as possible.

MLX's ring all_sum moves every byte through every link of the ring, so its speed is the speed
of the ring's *slowest* link. When the cabling allows more than one ring (a full mesh of Macs,
Ethernet next to Thunderbolt), the hostfile's order is one ring among many, and one slow or
degraded cable in it costs the whole job. Choosing the ring is the *bottleneck travelling
salesman problem* on the measured link bandwidths: maximise the minimum edge weight of a
Hamiltonian cycle.

* ``LinkMatrix``: what ``orch`` measured between every pair of hosts (``probe/linkbw.py``):
  per pair and per path (a shared subnet: one cable, or the Ethernet), the throughput in each
  direction. A pair's bandwidth is its fastest path, and a path's bandwidth is the slower of
  its two directions (the ring all_sum sends both ways).
* ``best_ring``: exact for up to ``EXACT_MAX`` hosts — binary search over the distinct link
  speeds, each threshold checked for a Hamiltonian cycle by a dynamic programme over subsets
  with bitsets (O(2^n · n) word operations: 1 ms at 10 hosts, ~0.15 s at 16) — and
  a greedy construction plus bottleneck-improving 2-opt beyond that.
* Ties and noise: two unshaped links measured at 9.6 and 10.1 Gbit/s are the same link. A
  preferred order (the hostfile's) is kept when its bottleneck is within ``tolerance`` of the
  best one, so a measurement never reshuffles a cluster for nothing; otherwise the result is
  deterministic (lowest host indices first, starting at host 0).
* ``apply_order``: the hostfile with its hosts in ring order, and each host's addresses
  reordered so that the address on the fastest path to its left neighbour comes first (the
  planner's Thunderbolt rule picks the first address that shares a subnet with the left
  neighbour, ``backends/ring.py``), so the run really uses the measured path.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Optional, Sequence

from pydantic import Field

from orchestrator.schema import Model

if TYPE_CHECKING:
    from orchestrator.hostfile import Hostfile

EXACT_MAX = 16  # exact search up to this many hosts (2^15 subsets: ~0.15 s in pure Python)
DEFAULT_TOLERANCE = 0.10  # bandwidths within 10% of each other are a tie (measurement noise)
SAME_MACHINE_GBIT_S = 1000.0  # two hostfile entries on one machine: memory, never the ring's bottleneck


class PathMeasurement(Model):
    """One path between two hosts (a shared subnet, or their plain addresses), measured both ways."""

    a: int  # host index (a < b)
    b: int
    ip_a: str  # a's address on this path (what b sends to)
    ip_b: str  # b's address on this path (what a sends to)
    a_to_b_gbit_s: Optional[float] = None  # None: not measured or failed (see error)
    b_to_a_gbit_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def gbit_s(self) -> float:
        """The slower direction; 0 when either failed (the ring needs both)."""
        if self.a_to_b_gbit_s is None or self.b_to_a_gbit_s is None:
            return 0.0
        return min(self.a_to_b_gbit_s, self.b_to_a_gbit_s)


class LinkMatrix(Model):
    """Every measured path between the hosts of a hostfile (host order = the hostfile's)."""

    hosts: list[str]
    paths: list[PathMeasurement] = Field(default_factory=list)
    same_machine: list[tuple[int, int]] = Field(default_factory=list)  # entries on one machine (a < b): not measured
    seconds: Optional[float] = None  # how long the measurement took

    def best_path(self, i: int, j: int) -> Optional[PathMeasurement]:
        a, b = min(i, j), max(i, j)
        cands = [p for p in self.paths if p.a == a and p.b == b]
        return max(cands, key=lambda p: p.gbit_s) if cands else None

    def bandwidth(self, i: int, j: int) -> float:
        if (min(i, j), max(i, j)) in self.same_machine:
            return SAME_MACHINE_GBIT_S
        p = self.best_path(i, j)
        return p.gbit_s if p is not None else 0.0

    def matrix(self) -> list[list[float]]:
        """Symmetric Gbit/s matrix (0: no working link; the diagonal is 0)."""
        n = len(self.hosts)
        return [[0.0 if i == j else self.bandwidth(i, j) for j in range(n)] for i in range(n)]


class RingChoice(Model):
    """The chosen ring and why, as printed and kept in plan.json."""

    order: list[int]  # host indices in ring order (the new hostfile order)
    hosts: list[str]  # their names
    bottleneck_gbit_s: float
    bottleneck_link: list[str]  # the two hosts of the slowest link of the chosen ring
    hostfile_bottleneck_gbit_s: float  # the hostfile order's slowest link, for comparison
    hostfile_bottleneck_link: list[str]
    kept_hostfile_order: bool
    exact: bool  # False: the heuristic (more than EXACT_MAX hosts)
    matrix: Optional[LinkMatrix] = None

    def words(self) -> str:
        ring = " -> ".join(self.hosts + self.hosts[:1])
        bl = f"{self.bottleneck_link[0]}-{self.bottleneck_link[1]}"
        text = f"ring order measured: {ring}; slowest link {bl} {fmt_gbit(self.bottleneck_gbit_s)}"
        if self.kept_hostfile_order:
            return text + " (the hostfile's order is already the fastest ring)"
        hb = f"{self.hostfile_bottleneck_link[0]}-{self.hostfile_bottleneck_link[1]}"
        return text + f" (hostfile order: slowest link {hb} {fmt_gbit(self.hostfile_bottleneck_gbit_s)})"


class NoRingError(ValueError):
    """No ring through every host uses only working links."""


def fmt_gbit(g: float) -> str:
    return f"{g:.3g} Gbit/s" if g >= 1 else f"{g * 1000:.3g} Mbit/s"


def ring_edges(order: Sequence[int]) -> list[tuple[int, int]]:
    n = len(order)
    if n < 2:
        return []
    if n == 2:
        return [(order[0], order[1])]
    return [(order[k], order[(k + 1) % n]) for k in range(n)]


def bottleneck(w: Sequence[Sequence[float]], order: Sequence[int]) -> tuple[float, Optional[tuple[int, int]]]:
    """The ring's slowest link and its speed (inf for a single host)."""
    edges = ring_edges(order)
    if not edges:
        return float("inf"), None
    e = min(edges, key=lambda uv: w[uv[0]][uv[1]])
    return w[e[0]][e[1]], e


def _hamiltonian_cycle(adj: list[int], n: int) -> Optional[list[int]]:
    """A Hamiltonian cycle through 0 in the graph of bitmask rows ``adj``, or None.

    reach[mask] = the set (bitmask) of vertices v such that a path 0 -> ... -> v visits exactly
    the vertices of ``mask`` (which always contains 0). The cycle closes when a full-mask end
    is adjacent to 0. Reconstruction walks back choosing the lowest index, so the result is
    deterministic.
    """
    if n == 1:
        return [0]
    if n == 2:
        return [0, 1] if adj[0] & 2 else None
    full = (1 << n) - 1
    reach = [0] * (1 << n)
    reach[1] = 1
    for mask in range(1, 1 << n, 2):  # only masks containing vertex 0
        ends = reach[mask]
        if not ends:
            continue
        e = ends
        while e:
            low = e & -e
            v = low.bit_length() - 1
            e ^= low
            nxt = adj[v] & ~mask
            while nxt:
                lb = nxt & -nxt
                nxt ^= lb
                reach[mask | lb] |= lb
    closing = reach[full] & adj[0] & ~1
    if not closing:
        return None
    # Walk back from the lowest closing end.
    v = (closing & -closing).bit_length() - 1
    path = [v]
    mask = full
    while mask != 1:
        prev_mask = mask & ~(1 << v)
        cands = reach[prev_mask] & adj[v]
        if prev_mask == 1:
            cands &= 1
        u = (cands & -cands).bit_length() - 1
        path.append(u)
        mask, v = prev_mask, u
    path.reverse()  # 0 first
    return path


def _canonical(order: list[int]) -> list[int]:
    """Start at the lowest index; of the two directions, the one whose second host is lower."""
    n = len(order)
    if n < 3:
        return sorted(order)
    k = order.index(min(order))
    rot = order[k:] + order[:k]
    rev = [rot[0]] + rot[1:][::-1]
    return min(rot, rev)


def exact_ring(w: Sequence[Sequence[float]]) -> Optional[list[int]]:
    """The ring maximising the slowest link (bottleneck TSP), exactly; None when no ring has only working links."""
    n = len(w)
    if n <= 1:
        return list(range(n))
    levels = sorted({w[i][j] for i in range(n) for j in range(n) if i != j and w[i][j] > 0})
    best: Optional[list[int]] = None
    lo, hi = 0, len(levels) - 1
    while lo <= hi:  # the largest threshold at which a ring still exists
        mid = (lo + hi) // 2
        t = levels[mid]
        adj = [sum(1 << j for j in range(n) if j != i and w[i][j] >= t) for i in range(n)]
        cycle = _hamiltonian_cycle(adj, n)
        if cycle is not None:
            best, lo = cycle, mid + 1
        else:
            hi = mid - 1
    return _canonical(best) if best is not None else None


def heuristic_ring(w: Sequence[Sequence[float]]) -> Optional[list[int]]:
    """For many hosts: greedy (fastest next link) from every start, then 2-opt moves that lift the bottleneck."""
    n = len(w)
    if n <= 3:
        return exact_ring(w)
    best: Optional[list[int]] = None
    best_b = -1.0
    for start in range(n):
        order, left = [start], set(range(n)) - {start}
        while left:
            cur = order[-1]
            nxt = max(sorted(left), key=lambda j: w[cur][j])
            order.append(nxt)
            left.discard(nxt)
        order = _two_opt(w, order)
        b, _ = bottleneck(w, order)
        if b > best_b:
            best, best_b = order, b
    if best is None or best_b <= 0:
        return None
    return _canonical(best)


def _two_opt(w: Sequence[Sequence[float]], order: list[int]) -> list[int]:
    """Reverse segments while that removes the current slowest link without making anything slower."""
    n = len(order)
    improved = True
    rounds = 0
    while improved and rounds < 10 * n:
        improved = False
        rounds += 1
        b, _ = bottleneck(w, order)
        for i in range(n - 1):
            for k in range(i + 2, n if i > 0 else n - 1):
                a, bb = order[i], order[i + 1]
                c, d = order[k], order[(k + 1) % n]
                if min(w[a][bb], w[c][d]) > b:
                    continue  # this move does not remove a bottleneck edge
                if min(w[a][c], w[bb][d]) > b:
                    cand = order[: i + 1] + order[i + 1 : k + 1][::-1] + order[k + 1 :]
                    nb, _ = bottleneck(w, cand)
                    if nb > b or (nb == b and _count_at(w, cand, b) < _count_at(w, order, b)):
                        order, improved = cand, True
                        break
            if improved:
                break
    return order


def _count_at(w, order, b) -> int:
    return sum(1 for u, v in ring_edges(order) if w[u][v] <= b)


def best_ring(w: Sequence[Sequence[float]], prefer: Optional[Sequence[int]] = None,
              tolerance: float = DEFAULT_TOLERANCE) -> tuple[list[int], float, bool, bool]:
    """(order, bottleneck, kept_preferred, exact) for the symmetric bandwidth matrix ``w``.

    ``prefer`` (default: 0..n-1, the hostfile's order) is kept when its bottleneck is at least
    ``(1 - tolerance)`` of the optimum. Raises ``NoRingError`` when no ring uses only links
    with a positive bandwidth.
    """
    n = len(w)
    prefer = list(prefer) if prefer is not None else list(range(n))
    exact = n <= EXACT_MAX
    order = exact_ring(w) if exact else heuristic_ring(w)
    if order is None:
        raise NoRingError("no ring through every host over working links")
    b, _ = bottleneck(w, order)
    pb, _ = bottleneck(w, prefer)
    if pb > 0 and pb >= b * (1 - tolerance):
        return prefer, pb, True, exact
    return order, b, False, exact


def choose_ring(matrix: LinkMatrix, tolerance: float = DEFAULT_TOLERANCE) -> RingChoice:
    """The ring for a measured matrix, with the hostfile order's bottleneck beside it."""
    w = matrix.matrix()
    n = len(w)
    try:
        order, b, kept, exact = best_ring(w, None, tolerance)
    except NoRingError:
        dead = [f"{matrix.hosts[p.a]}-{matrix.hosts[p.b]} ({p.error or 'no throughput'})"
                for p in matrix.paths if p.gbit_s <= 0]
        raise NoRingError("no ring through all of " + ", ".join(matrix.hosts) + " uses only working links"
                          + (f"; failed: {'; '.join(dead)}" if dead else "")) from None
    _, e = bottleneck(w, order)
    hb, he = bottleneck(w, list(range(n)))
    names = matrix.hosts
    return RingChoice(order=order, hosts=[names[i] for i in order], bottleneck_gbit_s=b,
                      bottleneck_link=[names[e[0]], names[e[1]]] if e else [],
                      hostfile_bottleneck_gbit_s=hb, hostfile_bottleneck_link=[names[he[0]], names[he[1]]] if he else [],
                      kept_hostfile_order=kept, exact=exact, matrix=matrix)


def apply_order(hostfile: "Hostfile", choice: RingChoice) -> "Hostfile":
    """The hostfile with its hosts in ring order, each host's address on the best path to its left neighbour first.

    Addresses with a prefix length are the planner's candidates (it takes the first one that
    shares a subnet with the left neighbour), so moving the measured path's address to the front
    makes the run use it; hosts without prefixes keep their addresses as they were.
    """
    hosts = [hostfile.hosts[i] for i in choice.order]
    matrix = choice.matrix
    n = len(hosts)
    out = []
    for k, host in enumerate(hosts):
        left = choice.order[(k - 1) % n]
        me = choice.order[k]
        p = matrix.best_path(me, left) if matrix is not None and n > 1 else None
        ips = list(host.ips)
        if p is not None and any("/" in ip for ip in ips):
            mine = p.ip_a if p.a == me else p.ip_b
            first = [ip for ip in ips if str(ipaddress.ip_interface(ip).ip) == mine]
            ips = first + [ip for ip in ips if ip not in first]
        out.append(host.model_copy(update={"ips": ips}))
    return hostfile.model_copy(update={"hosts": out})
