"""Ring planning: listen addresses, the Thunderbolt left-neighbour rule, ports, the gate."""

import json
import socket
from pathlib import Path

import pytest

from orchestrator.hostfile import ConfigError, load_hostfile, local_hostfile, parse_hostfile
from orchestrator.plan import choose_ports, plan_job

ROOT = Path(__file__).resolve().parent.parent


def test_thunderbolt_ring_each_rank_listens_on_link_to_left_neighbour():
    hf = load_hostfile(ROOT / "hostfiles" / "thunderbolt-ring-4mac.json")
    plan = plan_job(hf, "ring", starting_port=40000)
    ips = [r.listen[0].rsplit(":", 1)[0] for r in plan.ranks]
    # mac0's left neighbour is mac3 (cable .12/30), mac1's is mac0 (.0/30), ...
    assert ips == ["192.168.0.14", "192.168.0.2", "192.168.0.6", "192.168.0.10"]
    # and the rule itself: rank i's address shares a /30 with an address of rank i-1's host
    import ipaddress
    for r in plan.ranks:
        left = hf.hosts[(r.host_index - 1) % 4]
        mine = ipaddress.ip_interface(next(i for i in hf.hosts[r.host_index].ips if i.startswith(ips[r.rank] + "/")))
        assert any(ipaddress.ip_interface(i).network == mine.network for i in left.ips)


def test_reordered_hosts_without_a_shared_link_is_a_clear_error():
    hf = load_hostfile(ROOT / "hostfiles" / "thunderbolt-ring-4mac.json")
    hf.hosts[1], hf.hosts[2] = hf.hosts[2], hf.hosts[1]  # mac0 -> mac2 has no cable
    with pytest.raises(ConfigError, match="left neighbour mac0.local"):
        plan_job(hf, "ring", starting_port=40000)


def test_mlx_hostfile_json_and_connections_per_ip():
    hf = parse_hostfile({"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]})
    plan = plan_job(hf, "ring", connections_per_ip=2, starting_port=41000)
    nodes = json.loads(plan.mlx_hostfile_json())
    assert [len(n) for n in nodes] == [2, 2]
    assert all(a.startswith("10.0.0.1:") for a in nodes[0]) and all(a.startswith("10.0.0.2:") for a in nodes[1])
    ports = [int(a.rsplit(":", 1)[1]) for n in nodes for a in n]
    assert len(set(ports)) == 4


def test_local_slots_get_distinct_free_ports_and_last_rank_is_gated():
    plan = plan_job(local_hostfile(4), "ring")
    assert plan.world_size == 4
    addrs = [r.listen[0] for r in plan.ranks]
    assert len(set(addrs)) == 4 and all(a.startswith("127.0.0.1:") for a in addrs)
    assert [r.gated for r in plan.ranks] == [False, False, False, True]


def test_single_rank_has_no_ring_and_no_gate():
    plan = plan_job(local_hostfile(1), "ring")
    assert plan.ranks[0].listen == [] and not plan.ranks[0].gated


def test_choose_ports_skips_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        ports = choose_ports(3, "127.0.0.1", start=busy)
    assert busy not in ports and len(set(ports)) == 3


def test_two_plans_do_not_collide():
    a = {p for r in plan_job(local_hostfile(8), "ring").ranks for p in r.listen}
    b = {p for r in plan_job(local_hostfile(8), "ring").ranks for p in r.listen}
    # random bases: overlapping ranges are possible but identical plans are not expected
    assert a != b


def test_remote_host_without_ips_is_a_config_error():
    hf = parse_hostfile({"hosts": [{"ssh": "far1"}, {"ssh": "far2"}]})
    with pytest.raises(ConfigError, match="needs the address this rank listens on"):
        plan_job(hf, "ring")


def test_mpi_plan_has_no_ring_addresses():
    hf = load_hostfile(ROOT / "hostfiles" / "mpi-cluster.json")
    plan = plan_job(hf, "mpi")
    assert plan.world_size == 6 and all(r.listen == [] and not r.gated for r in plan.ranks)
    assert [r.host for r in plan.ranks] == ["node1", "node1", "node2", "node2", "node3", "node3"]


def test_without_a_backend_the_plan_chooses_and_says_why():
    plan = plan_job(local_hostfile(2))
    assert plan.backend == "ring" and "no rdma matrix" in plan.backend_reason


def test_local_ranks_know_their_index_on_the_machine_and_torchrun_names(tmp_path):
    from orchestrator.plan import write_files

    plan = plan_job(local_hostfile(3), "ring")
    assert [(r.local_rank, r.local_size) for r in plan.ranks] == [(0, 3), (1, 3), (2, 3)]
    paths = write_files(plan, tmp_path)
    assert json.loads(Path(paths["MLX_HOSTFILE"]).read_text()) == plan.mlx_hostfile
    env = plan.rank_env(plan.ranks[2], paths)
    assert env == {"MLX_RANK": "2", "RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
                   "MLX_HOSTFILE": paths["MLX_HOSTFILE"]}


def test_single_rank_ring_gets_no_hostfile(tmp_path):
    from orchestrator.plan import write_files

    plan = plan_job(local_hostfile(1), "ring")
    assert write_files(plan, tmp_path) == {} and "MLX_HOSTFILE" not in plan.rank_env(plan.ranks[0], {})


@pytest.mark.parametrize("hostfile, backend", [
    ("local-2", None), ("local-4", "ring"), ("thunderbolt-ring-4mac", "ring"), ("mpi-cluster", "mpi"),
    ("rdma-mesh", None), ("local-2", "nccl")])
def test_the_plan_is_what_validation_gives(tmp_path, hostfile, backend):
    """plan_job constructs its plan without validating (launch speed): validating the same values must give
    the same plan, field by field and type by type (a wrong type from the planner would show here)."""
    from orchestrator.plan import JobPlan
    from tests.test_backends import mesh

    path = ROOT / "hostfiles" / f"{hostfile}.json"
    if hostfile == "rdma-mesh":  # a full RDMA mesh: jaccl, with its coordinator and matrix in the plan
        path = tmp_path / "mesh.json"
        path.write_text(json.dumps(mesh(3)))
    plan = plan_job(load_hostfile(path), backend, connections_per_ip=2 if hostfile == "local-2" else 1,
                    starting_port=41000)
    if hostfile == "rdma-mesh":
        assert plan.backend == "jaccl" and plan.rdma and plan.coordinator
    validated = JobPlan.model_validate(plan.model_dump())
    assert validated == plan and validated.model_dump() == plan.model_dump()

    def types(p):
        return ([type(getattr(p, k)) for k in type(p).model_fields],
                [[type(getattr(r, k)) for k in type(r).model_fields] for r in p.ranks])
    assert types(validated) == types(plan)
