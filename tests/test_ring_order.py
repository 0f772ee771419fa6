"""The fastest ring (orchestrator/ringorder.py): bottleneck-TSP on known matrices, ties, apply_order, the measured matrix."""

from __future__ import annotations

import itertools
import random

import pytest

from orchestrator.plan import ringorder
from orchestrator.hostfile import parse_hostfile
from orchestrator.plan import plan_job
from orchestrator.plan.ringorder import (LinkMatrix, NoRingError, PathMeasurement, apply_order, best_ring, bottleneck,
                                    choose_ring, exact_ring, heuristic_ring)


def sym(n: int, edges: dict[tuple[int, int], float], default: float = 0.0) -> list[list[float]]:
    w = [[0.0 if i == j else default for j in range(n)] for i in range(n)]
    for (i, j), v in edges.items():
        w[i][j] = w[j][i] = v
    return w


def brute(w) -> float:
    """The optimum by trying every ring (host 0 fixed first)."""
    n = len(w)
    best = 0.0
    for perm in itertools.permutations(range(1, n)):
        b, _ = bottleneck(w, [0, *perm])
        best = max(best, b)
    return best


def test_hand_checked_full_mesh_of_four_avoids_the_slow_link():
    # Full mesh of 4, every link 10 except 0-1 at 0.03: the hostfile ring 0-1-2-3 uses it; 0-2-1-3 does not.
    w = sym(4, {(0, 1): 0.03}, default=10.0)
    order, b, kept, exact = best_ring(w)
    assert exact and not kept
    assert b == 10.0
    assert order == [0, 2, 1, 3]  # canonical: starts at 0, lower second host; edges 0-2, 2-1, 1-3, 3-0
    assert (0, 1) not in ringorder.ring_edges(order) and (1, 0) not in ringorder.ring_edges(order)
    assert bottleneck(w, [0, 1, 2, 3]) == (0.03, (0, 1))


def test_hand_checked_five_hosts_where_the_best_ring_still_has_a_slowish_link():
    # Links: a ring 0-1-2-3-4-0 at 5, chords at 1 except 0-2 at 8 and 2-4 at 8 and 1-3 at 7.
    # Best bottleneck: rings through 0-2, 2-4 and 1-3 with the rest ring edges: 0-2-4-3-1-0 = min(8,8,5,7,5) = 5; the
    # plain ring is also 5 -> tie: the hostfile order is kept.
    w = sym(5, {(0, 1): 5, (1, 2): 5, (2, 3): 5, (3, 4): 5, (4, 0): 5, (0, 2): 8, (2, 4): 8, (1, 3): 7}, default=1.0)
    order, b, kept, _ = best_ring(w)
    assert (order, b, kept) == ([0, 1, 2, 3, 4], 5, True)
    # Slow the plain ring's 3-4 to 2: now 0-2-4-... needs 4's other neighbour; 0-1-3-2-4-0? edges 0-1 5, 1-3 7, 3-2 5,
    # 2-4 8, 4-0 5 -> 5, and it avoids 3-4.
    w[3][4] = w[4][3] = 2.0
    order, b, kept, _ = best_ring(w)
    assert b == 5 and not kept and brute(w) == 5
    assert (3, 4) not in {tuple(sorted(e)) for e in ringorder.ring_edges(order)}


def test_ties_keep_the_hostfile_order_and_noise_within_tolerance_too():
    w = sym(4, {}, default=10.0)  # all equal: any ring is optimal
    assert best_ring(w)[0:3] == ([0, 1, 2, 3], 10.0, True)
    # 0-1 measured 5% slower than the rest: noise, the hostfile order stays.
    w = sym(4, {(0, 1): 9.5}, default=10.0)
    assert best_ring(w)[2] is True
    # ...but 30% slower is real: reordered, unless the tolerance is widened.
    w = sym(4, {(0, 1): 7.0}, default=10.0)
    assert best_ring(w)[2] is False
    assert best_ring(w, tolerance=0.5)[2] is True
    # tolerance 0 with an exact tie: still kept (not worse).
    assert best_ring(sym(4, {}, default=3.0), tolerance=0.0)[2] is True


def test_deterministic_result_among_equal_rings():
    w = sym(4, {(0, 1): 0.1, (2, 3): 0.1}, default=10.0)  # 0-2-1-3 and 0-3-1-2 both avoid both slow links
    first = exact_ring(w)
    assert first == exact_ring(w) == [0, 2, 1, 3]


def test_no_ring_over_working_links_is_an_error_naming_the_dead_links():
    # A star: host 0 linked to everyone, nobody else linked: no ring through 4 hosts.
    w = sym(4, {(0, 1): 1, (0, 2): 1, (0, 3): 1})
    with pytest.raises(NoRingError):
        best_ring(w)
    m = LinkMatrix(hosts=["a", "b", "c", "d"], paths=[
        PathMeasurement(a=0, b=1, ip_a="10.0.0.1", ip_b="10.0.0.2", a_to_b_gbit_s=1, b_to_a_gbit_s=1),
        PathMeasurement(a=2, b=3, ip_a="10.0.1.1", ip_b="10.0.1.2", error="connection refused"),
    ])
    with pytest.raises(NoRingError, match=r"c-d \(connection refused\)"):
        choose_ring(m)


def test_small_rings():
    assert best_ring([[0.0]])[0] == [0]
    assert best_ring(sym(2, {(0, 1): 3.0}))[0:2] == ([0, 1], 3.0)
    assert best_ring(sym(3, {(0, 1): 3.0, (1, 2): 1.0, (0, 2): 2.0}))[0:2] == ([0, 1, 2], 1.0)


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8])
def test_exact_matches_brute_force_on_random_matrices(n):
    rng = random.Random(n)
    for _ in range(15):
        w = sym(n, {(i, j): rng.choice([0.0, 0.05, 1.0, 2.5, 10.0, 10.0, 40.0])
                    for i in range(n) for j in range(i + 1, n)})
        want = brute(w)
        got = exact_ring(w)
        if want <= 0:
            assert got is None
            continue
        assert got is not None and sorted(got) == list(range(n))
        assert bottleneck(w, got)[0] == want


@pytest.mark.parametrize("n", [6, 8])
def test_heuristic_finds_the_optimum_on_meshes_with_a_few_slow_links(n):
    rng = random.Random(100 + n)
    for _ in range(10):
        w = sym(n, {}, default=10.0)
        for _ in range(n // 2):
            i, j = rng.sample(range(n), 2)
            w[i][j] = w[j][i] = 0.05
        h = heuristic_ring(w)
        assert h is not None and sorted(h) == list(range(n))
        assert bottleneck(w, h)[0] == brute(w)


def test_beyond_the_exact_limit_the_heuristic_avoids_slow_links():
    n = ringorder.EXACT_MAX + 4
    rng = random.Random(7)
    w = sym(n, {}, default=10.0)
    for i in range(n):  # the hostfile ring i -> i+1 is slow everywhere
        j = (i + 1) % n
        w[i][j] = w[j][i] = 0.05
    for _ in range(n):
        i, j = rng.sample(range(n), 2)
        w[i][j] = w[j][i] = rng.choice([1.0, 0.05])
    order, b, kept, exact = best_ring(w)
    assert not exact and not kept and sorted(order) == list(range(n))
    assert b >= 1.0


def test_exact_search_at_its_limit_is_fast_enough():
    import time

    n = ringorder.EXACT_MAX
    rng = random.Random(3)
    w = sym(n, {(i, j): rng.uniform(0.1, 10) for i in range(n) for j in range(i + 1, n)})
    t0 = time.process_time()
    exact_ring(w)
    # Generous bound (a CPU-time ceiling, not a benchmark): catches an accidental exponential blow-up only.
    assert time.process_time() - t0 < 30


def mesh_hostfile():
    """4 hosts in a full mesh: link k between (a, b) is 10.9.k.0/30, a is .1, b is .2. Hosts list their
    addresses in link order; the hostfile ring is host0..host3."""
    pairs = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3)]
    ips = {i: [] for i in range(4)}
    for k, (a, b) in enumerate(pairs):
        ips[a].append(f"10.9.{k}.1/30")
        ips[b].append(f"10.9.{k}.2/30")
    data = {"backend": "ring", "hosts": [{"ssh": f"h{i}", "ips": ips[i]} for i in range(4)]}
    return parse_hostfile(data, "mesh.json"), pairs


def mesh_matrix(pairs, slow=(0, 1)):
    paths = []
    for k, (a, b) in enumerate(pairs):
        lo, hi = min(a, b), max(a, b)
        ip = {a: f"10.9.{k}.1", b: f"10.9.{k}.2"}
        g = 0.03 if {a, b} == set(slow) else 9.0 + k / 10
        paths.append(PathMeasurement(a=lo, b=hi, ip_a=ip[lo], ip_b=ip[hi], a_to_b_gbit_s=g, b_to_a_gbit_s=g * 1.1))
    return LinkMatrix(hosts=["h0", "h1", "h2", "h3"], paths=paths)


def test_choose_and_apply_order_plan_listens_on_the_chosen_links():
    hf, pairs = mesh_hostfile()
    choice = choose_ring(mesh_matrix(pairs))
    assert choice.hosts == ["h0", "h2", "h1", "h3"] and not choice.kept_hostfile_order
    assert choice.hostfile_bottleneck_link == ["h0", "h1"] and choice.hostfile_bottleneck_gbit_s == 0.03
    assert choice.bottleneck_gbit_s >= 9.0
    words = choice.words()
    assert "h0 -> h2 -> h1 -> h3 -> h0" in words and "30 Mbit/s" in words
    ordered = apply_order(hf, choice)
    assert [h.name for h in ordered.hosts] == ["h0", "h2", "h1", "h3"]
    plan = plan_job(ordered, "ring", 1, 30000)
    # Each rank listens on its address on the link to its left neighbour: h0 <- h3 (link 3), h2 <- h0 (link 4),
    # h1 <- h2 (link 1), h3 <- h1 (link 5).
    listen = [r.listen[0].rsplit(":", 1)[0] for r in plan.ranks]
    assert listen == ["10.9.3.2", "10.9.4.2", "10.9.1.1", "10.9.5.2"]


def test_apply_order_prefers_the_faster_of_two_paths_to_the_left_neighbour():
    # Two hosts, each on Ethernet (/24) and one Thunderbolt cable (/30); Ethernet listed first.
    data = {"hosts": [{"ssh": "a", "ips": ["192.168.1.10/24", "10.0.0.1/30"]},
                      {"ssh": "b", "ips": ["192.168.1.11/24", "10.0.0.2/30"]}]}
    hf = parse_hostfile(data, "two.json")
    assert plan_job(hf, "ring", 1, 30000).ranks[1].listen[0].startswith("192.168.1.11:")
    m = LinkMatrix(hosts=["a", "b"], paths=[
        PathMeasurement(a=0, b=1, ip_a="192.168.1.10", ip_b="192.168.1.11", a_to_b_gbit_s=0.9, b_to_a_gbit_s=0.9),
        PathMeasurement(a=0, b=1, ip_a="10.0.0.1", ip_b="10.0.0.2", a_to_b_gbit_s=12.0, b_to_a_gbit_s=11.0),
    ])
    assert m.bandwidth(0, 1) == 11.0
    choice = choose_ring(m)
    plan = plan_job(apply_order(hf, choice), "ring", 1, 30000)
    assert [r.listen[0].rsplit(":", 1)[0] for r in plan.ranks] == ["10.0.0.1", "10.0.0.2"]


def test_a_path_with_one_failed_direction_counts_as_no_link():
    p = PathMeasurement(a=0, b=1, ip_a="x", ip_b="y", a_to_b_gbit_s=5.0, b_to_a_gbit_s=None, error="timed out")
    assert p.gbit_s == 0.0
    assert LinkMatrix(hosts=["a", "b"], paths=[p]).matrix() == [[0.0, 0.0], [0.0, 0.0]]


# ----------------------------------------------------------------------------- linkbw: paths, rounds, the probe


def test_candidate_paths_one_per_shared_subnet_and_rounds_never_share_a_host():
    from orchestrator.probe.linkbw import candidate_paths, needs_measuring, rounds_of

    hf, pairs = mesh_hostfile()
    paths = candidate_paths(hf.hosts)
    assert sorted((a, b) for a, b, _, _ in paths) == sorted(tuple(sorted(p)) for p in pairs)
    assert (0, 1, "10.9.0.1", "10.9.0.2") in paths
    rounds = rounds_of(paths)
    assert len(rounds) == 3 and sum(len(r) for r in rounds) == 6
    for r in rounds:
        used = [h for a, b, _, _ in r for h in (a, b)]
        assert len(used) == len(set(used))
    assert needs_measuring(hf) is None
    # Ethernet (/24) plus a Thunderbolt cable (/30) between the same two hosts: two paths, worth measuring.
    two = parse_hostfile({"hosts": [{"ssh": "a", "ips": ["192.168.1.10/24", "10.0.0.1/30"]},
                                    {"ssh": "b", "ips": ["192.168.1.11/24", "10.0.0.2/30"]}]}, "two.json")
    assert len(candidate_paths(two.hosts)) == 2 and needs_measuring(two) is None
    # Plain addresses: one path per pair; three hosts with one path each make only one ring.
    plain = parse_hostfile({"hosts": [{"ssh": n, "ips": [f"10.1.0.{k}"]} for k, n in enumerate("abc", 1)]}, "p.json")
    assert candidate_paths(plain.hosts) == [(0, 1, "10.1.0.1", "10.1.0.2"), (0, 2, "10.1.0.1", "10.1.0.3"),
                                            (1, 2, "10.1.0.2", "10.1.0.3")]
    assert "only one ring" in needs_measuring(plain)
    local = parse_hostfile({"hosts": [{"ssh": "localhost", "slots": 2}]}, "l.json")
    assert "this machine" in needs_measuring(local)


def test_link_probe_measures_loopback_paths_and_names_an_address_it_cannot_listen_on():
    """The real probe (local runners, loopback addresses): every path gets a rate both ways, except the one whose
    address is not on this machine, which says why."""
    import asyncio
    import sys

    from orchestrator.probe.linkbw import measure_links
    from orchestrator.probe.runner import Runner

    hf = parse_hostfile({"hosts": [{"ssh": "a", "ips": ["127.0.0.1/8"]}, {"ssh": "b", "ips": ["127.0.0.2/8"]},
                                   {"ssh": "c", "ips": ["127.0.0.3/8"]}, {"ssh": "d", "ips": ["127.0.0.4/8"]}]}, "lo.json")
    runners = {i: Runner(h.name, sys.executable, {}) for i, h in enumerate(hf.hosts)}
    m = asyncio.run(asyncio.wait_for(measure_links(hf, runners, seconds=0.05, timeout=20), 60))
    assert len(m.paths) == 6
    for p in m.paths:
        assert p.error is None and p.a_to_b_gbit_s > 0 and p.b_to_a_gbit_s > 0, p
    assert choose_ring(m).exact

    # 192.0.2.0/24 (TEST-NET-1) is on no interface here: neither side can listen, and each direction says so.
    bad = parse_hostfile({"hosts": [{"ssh": "a", "ips": ["192.0.2.1/24"]}, {"ssh": "b", "ips": ["192.0.2.2/24"]}]},
                         "bad.json")
    mb = asyncio.run(measure_links(bad, {0: Runner("a", sys.executable, {}), 1: Runner("b", sys.executable, {})},
                                   seconds=0.05))
    assert mb.paths[0].gbit_s == 0 and "cannot listen on 192.0.2." in mb.paths[0].error, mb.paths[0]
    with pytest.raises(NoRingError, match="a-b"):
        choose_ring(mb)
    # Different subnets: no path at all.
    apart = parse_hostfile({"hosts": [{"ssh": "a", "ips": ["127.0.0.1/8"]}, {"ssh": "b", "ips": ["10.254.254.254/8"]}]}, "y")
    assert asyncio.run(measure_links(apart, {}, seconds=0.05)).paths == []
    hf2 = parse_hostfile({"hosts": [{"ssh": "a", "ips": ["127.0.0.1/8"]}, {"ssh": "b", "ips": ["127.0.0.2/8"]}]}, "x")
    # Host b's runner is missing (as when SSH to it failed): the path is reported failed, naming it.
    m2 = asyncio.run(measure_links(hf2, {0: Runner("a", sys.executable, {})}, seconds=0.05))
    assert m2.paths[0].gbit_s == 0 and "no link probe could run on b" in m2.paths[0].error


# ----------------------------------------------------------------------------- the commands: what they say


def test_commands_refuse_what_has_no_ring_order_in_one_line(tmp_path):
    import json

    from tests.orch_helpers import RECIPES, run_orch

    r = run_orch("run", "-n", "2", "--backend", "mpi", "--ring-order", "measured", str(RECIPES / "allsum_check.py"),
                 "--run-dir", str(tmp_path / "mpi"), cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "--ring-order measured: only the ring backend" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}))
    r = run_orch("hostfile", "--hostfile", str(hf), cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "add --ring-order measured" in r.stderr, r.stderr
    r = run_orch("hostfile", "--hosts", "a,b", "--over", "thunderbolt", "--ring-order", "measured", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "--hostfile FILE --ring-order measured" in r.stderr, r.stderr
    r = run_orch("hostfile", "--hostfile", str(tmp_path / "missing.json"), "--ring-order", "measured", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "missing.json" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_local_run_has_nothing_to_measure_and_runs_in_the_hostfile_order(tmp_path):
    import json

    from tests.orch_helpers import RECIPES, run_orch

    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--ring-order", "measured", str(RECIPES / "allsum_check.py"), "--run-dir", str(rd),
                 cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "nothing to choose (every rank runs on this machine)" in r.stderr
    assert json.loads((rd / "plan.json").read_text()).get("ring_order") is None


def test_unreachable_hosts_fail_the_run_before_it_starts_naming_them(tmp_path):
    """Nothing listens on port 1 of 127.0.0.2-5 (SSH hosts, not this machine by name): exit 1, summary says why."""
    import json

    from tests.orch_helpers import RECIPES, run_orch

    pairs = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3)]
    ips = {i: [] for i in range(4)}
    for k, (a, b) in enumerate(pairs):
        ips[a].append(f"10.9.{k}.1/30")
        ips[b].append(f"10.9.{k}.2/30")
    hf = tmp_path / "mesh.json"
    hf.write_text(json.dumps({"hosts": [{"ssh": f"127.0.0.{i + 2}", "port": 1, "ips": ips[i]} for i in range(4)]}))
    rd = tmp_path / "run"
    r = run_orch("run", "--hostfile", str(hf), "--ring-order", "measured", "--connect-timeout", "5",
                 str(RECIPES / "allsum_check.py"), "--run-dir", str(rd), cwd=tmp_path, timeout=90)
    assert r.returncode == 1, r.stderr
    assert "--ring-order measured: cannot reach 127.0.0.2:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "failed" and "cannot reach" in s["reason"]


def test_two_entries_of_one_machine_are_never_measured_nor_the_bottleneck():
    from orchestrator.probe.linkbw import candidate_paths, needs_measuring, same_machine_pairs

    hf = parse_hostfile({"hosts": [{"ssh": "m1", "ips": ["10.0.0.1/24"]}, {"ssh": "m2", "ips": ["10.0.0.2/24"]},
                                   {"ssh": "m1", "ips": ["10.0.0.11/24"]}, {"ssh": "m3", "ips": ["10.0.0.3/24"]}]}, "d.json")
    assert same_machine_pairs(hf.hosts) == [(0, 2)]
    assert all({a, b} != {0, 2} for a, b, _, _ in candidate_paths(hf.hosts))
    assert needs_measuring(hf) is None
    assert "single host" in needs_measuring(parse_hostfile({"hosts": [{"ssh": "m", "ips": ["10.0.0.1/24"]},
                                                                       {"ssh": "m", "ips": ["10.0.0.2/24"]}]}, "s"))
    paths = [PathMeasurement(a=a, b=b, ip_a=ia, ip_b=ib, a_to_b_gbit_s=5.0, b_to_a_gbit_s=5.0)
             for a, b, ia, ib in candidate_paths(hf.hosts)]
    m = LinkMatrix(hosts=["m1", "m2", "m1", "m3"], paths=paths, same_machine=same_machine_pairs(hf.hosts))
    assert m.bandwidth(0, 2) == ringorder.SAME_MACHINE_GBIT_S
    choice = choose_ring(m)
    assert choice.bottleneck_gbit_s == 5.0
