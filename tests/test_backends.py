"""Backends: mlx.launch's per-rank contract for jaccl / jaccl-ring / nccl (compared with mlx.launch itself),
the rdma-matrix validation, automatic backend choice, and what failed JACCL ranks leave behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator import backends
from orchestrator.backends import jaccl
from orchestrator.hostfile import ConfigError, load_hostfile, local_hostfile, parse_hostfile
from orchestrator.plan import choose_ports, plan_job, write_files

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stderr-jaccl"
TORCHRUN = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def mesh(n: int, backend=None, missing=(), names=None, ips=True) -> dict:
    """A hostfile in mlx.distributed_config's shape: host i reaches host j over rdma_en{j+2}; ``missing`` pairs get null."""
    names = names or [f"mac{i}" for i in range(n)]
    hosts = []
    for i in range(n):
        row = [None if i == j or (i, j) in missing else f"rdma_en{j + 2}" for j in range(n)]
        h = {"ssh": names[i], "rdma": row}
        if ips:
            h["ips"] = [f"10.0.0.{i + 1}"]
        hosts.append(h)
    data = {"hosts": hosts}
    if backend:
        data["backend"] = backend
    return data


def ring_only(n: int) -> set[tuple[int, int]]:
    """Pairs that are not ring neighbours (so only the ring has devices)."""
    return {(i, j) for i in range(n) for j in range(n) if i != j and (j - i) % n not in (1, n - 1)}


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["hosts"][1]["rdma"].pop(), "hosts[1] (mac1).rdma has 2 entries; it needs one per host (3)"),
    (lambda d: d["hosts"][2]["rdma"].__setitem__(2, "rdma_en4"), "hosts[2] (mac2).rdma[2] is \"rdma_en4\"; a host's entry for itself must be null"),
    (lambda d: d["hosts"][0].__setitem__("slots", 2), "hosts[0] (mac0) has slots 2; JACCL runs one rank per host"),
    (lambda d: [h.__setitem__("rdma", []) for h in d["hosts"]], "the jaccl backend needs an \"rdma\" matrix"),
    (lambda d: d["hosts"][0].pop("ips"), "hosts[0] (mac0): the jaccl backend needs rank 0's address"),
])
def test_jaccl_matrix_errors_are_one_line_naming_file_host_and_fix(tmp_path, mutate, expected):
    data = mesh(3, "jaccl")
    mutate(data)
    p = tmp_path / "hosts.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        plan_job(load_hostfile(p))
    msg = str(e.value)
    assert msg.startswith(str(p)) and expected in msg and "\n" not in msg, msg


def test_missing_pairs_are_named_like_mlx_launch_first_three_and_a_count():
    hf = parse_hostfile(mesh(4, "jaccl", missing={(0, 2), (2, 0), (1, 3), (3, 1)}))
    with pytest.raises(ConfigError) as e:
        plan_job(hf)
    assert "no RDMA device is listed for mac0 to mac2, mac1 to mac3, mac2 to mac0 and 1 more" in str(e.value)
    assert "jaccl-ring" in str(e.value)  # the way out: a ring is enough for jaccl-ring


def test_jaccl_ring_needs_only_neighbours_and_names_a_missing_neighbour():
    data = mesh(4, "jaccl-ring", missing=ring_only(4))
    assert plan_job(parse_hostfile(data)).backend == "jaccl-ring"
    data = mesh(4, "jaccl-ring", missing=ring_only(4) | {(1, 2)})
    with pytest.raises(ConfigError, match=r"no RDMA device is listed for mac1 to mac2; jaccl-ring needs one between each host"):
        plan_job(parse_hostfile(data))


def test_rdma_entries_must_be_device_names():
    data = mesh(2)
    data["hosts"][0]["rdma"][1] = 7
    with pytest.raises(ConfigError, match=r"hosts\[0\].rdma: entry \[1\] is 7; each entry is null, an RDMA device name"):
        parse_hostfile(data, "h.json")


def test_unknown_backend_lists_all_five():
    with pytest.raises(ConfigError, match='"ring", "mpi", "jaccl", "jaccl-ring", "nccl"'):
        parse_hostfile({"backend": "gloo", "hosts": ["a"]})


# ----------------------------------------------------------------------------- automatic choice


@pytest.mark.parametrize("data, expected, why", [
    (mesh(3), "jaccl", "links every pair of the 3 hosts (full mesh)"),
    (mesh(4, missing=ring_only(4)), "jaccl-ring", "ring neighbours but not every pair (mac0 to mac2, mac1 to mac3, mac2 to mac0 and 1 more missing)"),
    (mesh(4, missing=ring_only(4) | {(2, 3)}), "ring", "neither a full mesh nor a ring (mac2 to mac3 missing)"),
    ({"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}, "ring", "no rdma matrix"),
    ({**mesh(3), "backend": "ring"}, "ring", "the hostfile names backend \"ring\""),
])
def test_auto_selection_follows_mlx_distributed_config_and_says_why(data, expected, why):
    choice = backends.choose(parse_hostfile(data))
    assert choice.name == expected and why in choice.reason, choice
    plan = plan_job(parse_hostfile(data))
    assert plan.backend == expected and plan.backend_reason == choice.reason


def test_backend_flag_wins_over_hostfile_and_matrix():
    plan = plan_job(parse_hostfile(mesh(2, "jaccl")), "nccl", starting_port=43000)
    assert plan.backend == "nccl" and plan.backend_reason == "--backend nccl" and plan.rdma is None


def test_malformed_matrix_without_named_backend_falls_back_to_ring_and_says_so():
    data = mesh(3)
    data["hosts"][0]["rdma"] = data["hosts"][0]["rdma"][:2]
    choice = backends.choose(parse_hostfile(data))
    assert choice.name == "ring" and "rdma matrix is unusable (hosts[0] (mac0).rdma has 2 entries" in choice.reason


# ----------------------------------------------------------------------------- what each rank is handed


def test_jaccl_rank_env_and_devices_file(tmp_path):
    data = mesh(3, "jaccl-ring")
    data["hosts"][0]["ips"] = ["10.0.0.1/30", "10.0.0.9/30"]
    data["envs"] = ["MLX_METAL_FAST_SYNCH=1"]
    plan = plan_job(parse_hostfile(data), starting_port=44100)
    paths = write_files(plan, tmp_path)
    assert json.loads(Path(paths["MLX_IBV_DEVICES"]).read_text()) == [h["rdma"] for h in data["hosts"]]
    for r in plan.ranks:
        env = plan.rank_env(r, paths)
        assert env["MLX_JACCL_COORDINATOR"].rsplit(":", 1)[0] == "10.0.0.1"  # rank 0's first ip, bare
        assert env["MLX_JACCL_COORDINATOR"] == plan.coordinator
        assert env["MLX_JACCL_RING"] == "1" and env["MLX_IBV_DEVICES"] == paths["MLX_IBV_DEVICES"]
        assert (env["MLX_RANK"], env["RANK"], env["WORLD_SIZE"]) == (str(r.rank), str(r.rank), "3")
        assert (env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("0", "1")  # one rank per remote Mac
        assert "MLX_HOSTFILE" not in env and not r.gated and not r.held


def test_nccl_gives_each_rank_its_gpu_index_on_its_machine():
    hf = parse_hostfile({"hosts": [{"ssh": "gpu1", "ips": ["10.0.0.1"], "slots": 2},
                                   {"ssh": "gpu2", "ips": ["10.0.0.2"], "slots": 2},
                                   {"ssh": "gpu1", "ips": ["10.0.0.3"]}]})  # the same machine listed twice
    plan = plan_job(hf, "nccl", starting_port=45100)
    envs = [plan.rank_env(r, {}) for r in plan.ranks]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1", "2"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["3", "3", "2", "2", "3"]
    assert {e["NCCL_HOST_IP"] for e in envs} == {"10.0.0.1"} and {e["MLX_WORLD_SIZE"] for e in envs} == {"5"}
    assert {e["NCCL_PORT"] for e in envs} == {plan.coordinator.rsplit(":", 1)[1]}


def test_mpi_ranks_share_one_environment_without_a_rank():
    plan = plan_job(local_hostfile(2), "mpi")
    envs = [plan.rank_env(r, {}) for r in plan.ranks]
    assert envs[0] == envs[1] and "MLX_RANK" not in envs[0] and "RANK" not in envs[0]
    assert envs[0]["WORLD_SIZE"] == "2"


def test_starting_port_is_used_and_a_busy_one_skipped():
    port = choose_ports(1, start=46000)[0]
    assert plan_job(local_hostfile(2), "nccl", starting_port=port).coordinator == f"127.0.0.1:{port}"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert plan_job(local_hostfile(2), "nccl", starting_port=port).coordinator != f"127.0.0.1:{port}"


# ----------------------------------------------------------------------------- the contract, against mlx.launch itself

PRINT_ENV = textwrap.dedent("""
    import json, os
    keys = sorted(k for k in os.environ if k.startswith(("MLX_", "NCCL_", "CUDA_")) or k in %r)
    env = {k: os.environ[k] for k in keys}
    for var in ("MLX_IBV_DEVICES", "MLX_HOSTFILE"):
        if var in env:
            with open(env[var]) as f:
                env[var] = {"content": f.read()}
    print("ENV " + json.dumps(env), flush=True)
""") % (sorted(TORCHRUN),)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "NCCL_", "CUDA_")) and k not in TORCHRUN
            and k not in ("COLUMNS", "LINES")}


def _envs_from(stdout: str) -> list[dict]:
    envs = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ENV ")]
    return sorted(envs, key=lambda e: int(e["MLX_RANK"]))


def _mlx_launch(args: list[str], script: Path) -> list[dict]:
    # mlx.launch's own entry point (the module has no __main__ block, so `python -m` would do nothing)
    launch = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", launch, *args, "--", sys.executable, str(script)],
                          env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return _envs_from(proc.stdout)


def _orch(plan, hostfile, script: Path, tmp_path: Path) -> list[dict]:
    """Each rank as a real process with what orch hands it (the hostfile's envs below, as mlx.launch orders them)."""
    paths = write_files(plan, tmp_path)
    out = []
    for r in plan.ranks:
        env = {**_clean_env(), **hostfile.env, **plan.rank_env(r, paths)}
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out += _envs_from(proc.stdout)
    return out


CASES = {
    # name: (hostfile or None for -n 2, mlx.launch args, orch backend)
    "jaccl": (mesh(2, names=["127.0.0.1", "127.0.0.1"], ips=False), ["--backend", "jaccl"], "jaccl"),
    "jaccl-ring": (mesh(4, missing=ring_only(4), names=["127.0.0.1"] * 4, ips=False), ["--backend", "jaccl-ring"], "jaccl-ring"),
    "nccl": (None, ["-n", "2", "--backend", "nccl"], "nccl"),
    "ring": (None, ["-n", "2", "--backend", "ring"], "ring"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_gets_exactly_what_mlx_launch_hands_it(tmp_path, name):
    data, args, backend = CASES[name]
    script = tmp_path / "print_env.py"
    script.write_text(PRINT_ENV)
    port = choose_ports(4, start=47000 + 100 * list(CASES).index(name))[0]
    if data is not None:
        data = {**data, "envs": ["MLX_METAL_FAST_SYNCH=1"]}
        for h in data["hosts"]:
            h.setdefault("ips", ["127.0.0.1"])
        hf_path = tmp_path / "hosts.json"
        hf_path.write_text(json.dumps(data))
        args = ["--hostfile", str(hf_path), *args]
        hostfile = load_hostfile(hf_path)
    else:
        hostfile = local_hostfile(2)
    theirs = _mlx_launch([*args, "--starting-port", str(port), "--nccl-port", str(port)], script)
    plan = plan_job(hostfile, backend, starting_port=port)
    files_dir = tmp_path / "orch-files"
    files_dir.mkdir()
    ours = _orch(plan, hostfile, script, files_dir)

    assert len(theirs) == len(ours) == plan.world_size
    for t, o in zip(theirs, ours):
        extra = set(o) - set(t)
        assert extra == TORCHRUN, extra  # torchrun's names beside MLX's own, nothing else
        assert {k: o[k] for k in t} == t  # every variable and file content mlx.launch hands this rank, identical
        assert (o["RANK"], o["WORLD_SIZE"]) == (o["MLX_RANK"], str(plan.world_size))
    if name in ("jaccl", "jaccl-ring"):
        assert json.loads(theirs[0]["MLX_IBV_DEVICES"]["content"]) == [h["rdma"] for h in data["hosts"]]


# ----------------------------------------------------------------------------- failures


def _fixture(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def test_every_fixture_is_classified():
    files = sorted(p.name for p in FIXTURES.glob("*.txt"))
    assert len(files) == 8
    for f in files:
        assert jaccl.classify(_fixture(f), 0) is not None, f


@pytest.mark.parametrize("fixture, cause, words, during_init", [
    ("distributed_config_rdma_not_enabled__macmini_m4_tb4_macos26_5_1__mlx3777_elided.txt",
     "jaccl_rdma_disabled", "jaccl: RDMA not enabled on <host>: enable RDMA with `rdma_ctl enable`", True),
    ("crash_sigsegv_ibv_reg_mr_null_pd__macmini_m4_exo1_0_71__exo2186_partial.txt",
     "jaccl_rdma_disabled", "jaccl: RDMA not enabled or a device missing on rank 1 on mac1 (its hostfile row names rdma_en2)", True),
    ("crash_sigsegv_tbt_post_recv_cable_unplug__2mac_tb__mlx4192.txt",
     "jaccl_link_lost", "a Thunderbolt cable was unplugged or a link went down mid-collective", False),
    ("exo_runner_rtr_errno22__macmini_rank1__exo1390_partial.txt",
     "jaccl_queue_pair", "could not bring a queue pair to RTR (errno 22): invalid address for this link", True),
    ("exo_runner_rtr_errno22__macstudio_rank0__exo1390_partial.txt",
     "jaccl_queue_pair", "(errno 22)", True),
    ("exo_runner_errors_pd_alloc_recv_errno2__m3ultra_x4__exo2111_inline.txt",
     "jaccl_no_protection_domain", "could not allocate an RDMA protection domain (its hostfile row names rdma_en2)", True),
    ("jaccl_no_ipv4_gid_patched_build__m4pro_macmini_x2_macos26_5_1__mlxpr4191_wrapped.txt",
     "jaccl_no_gid", "has no IPv4 address", True),
    ("jaccl_qp_create_errno16_patched_build__m5max_m4pro_macos26_5_1__mlxpr4209_wrapped.txt",
     "jaccl_queue_pairs_exhausted", "ran out of RDMA queue pairs", True),
])
def test_recorded_jaccl_failures_name_the_cause(fixture, cause, words, during_init):
    plan = plan_job(parse_hostfile(mesh(2, "jaccl")), starting_port=48000)
    rank = 1 if "rdma_en2" in words else 0
    d = jaccl.classify(_fixture(fixture), rank, plan)
    assert d.cause == cause and words in d.message, d
    assert d.during_init is during_init and (d.cause in jaccl.INIT_FAILURES) is during_init
    assert "\n" not in d.message


def test_side_channel_loss_alone_is_a_secondary_failure():
    recv_line = [line for line in _fixture("exo_runner_errors_pd_alloc_recv_errno2__m3ultra_x4__exo2111_inline.txt")
                 if "Recv failed" in line]
    d = jaccl.classify(recv_line, 2)
    assert d.cause == "jaccl_peer_lost" and d.secondary and "recv errno 2" in d.message


def test_ring_output_is_not_mistaken_for_jaccl():
    ring = (Path(__file__).resolve().parent / "fixtures" / "stderr" / "ring_couldnt_connect.txt").read_text().splitlines()
    assert jaccl.classify(ring, 1) is None


def _segfaulted_exit() -> int:
    """A real process that dies of SIGSEGV (what a JACCL rank shows when it crashes without a word)."""
    proc = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGSEGV, proc.returncode
    return -proc.returncode


def test_silent_segfault_before_init_means_rdma_and_after_means_the_link():
    sig = _segfaulted_exit()
    plan = plan_job(parse_hostfile(mesh(2, "jaccl")), starting_port=48100)
    early = jaccl.classify([], 0, plan, signal=sig, initialised=False)
    assert early.cause == "jaccl_rdma_disabled" and early.during_init and "rdma_en3" in early.message
    late = jaccl.classify([], 0, plan, signal=sig, initialised=True)
    assert late.cause == "jaccl_segfault" and not late.during_init and "cable" in late.message
    assert jaccl.classify([], 0, plan, signal=signal.SIGTERM) is None
    assert jaccl.classify([], 0, None, signal=sig, initialised=True) is None  # no plan: not known to be JACCL


def test_faulthandler_segfault_text_is_recognised():
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)"],
                          capture_output=True, text=True, timeout=60)
    assert "Segmentation fault" in proc.stderr
    plan = plan_job(parse_hostfile(mesh(2, "jaccl")), starting_port=48200)
    d = jaccl.classify(proc.stderr.splitlines(), 1, plan, initialised=True)
    assert d.cause == "jaccl_segfault"
    # the same crash on the ring is not JACCL's
    assert jaccl.classify(proc.stderr.splitlines(), 1, plan_job(local_hostfile(2), "ring"), initialised=True) is None


def test_sigkill_warning_mentions_wired_memory_and_reboot():
    assert "wired" in jaccl.SIGKILL_WARNING and "reboot" in jaccl.SIGKILL_WARNING and "\n" not in jaccl.SIGKILL_WARNING
