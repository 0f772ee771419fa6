"""Checkpoints are atomic: whatever moment a writer dies at, --resume finds one that loads."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from orchestrator.runtime import checkpoint as ckpt
from tests.runtime_helpers import kill_group


def save(root: Path, step: int, keep: int = 0) -> Path:
    w = mx.full((8, 8), float(step))
    return ckpt.save(root, step, {"w": w}, {"m": w * 2, "step": mx.array(step, dtype=mx.uint64)},
                     {"epoch": 0, "offset": step}, keep=keep)


def loaded_step(c: ckpt.Checkpoint) -> int:
    model, opt = ckpt.load(c)
    step = int(model["w"][0, 0].item())
    assert np.all(np.array(model["w"]) == step) and np.all(np.array(opt["m"]) == 2 * step)
    assert int(opt["step"].item()) == step == c.step == c.state["offset"]
    return step


def test_save_writes_a_complete_checkpoint_and_the_manifest(tmp_path):
    path = save(tmp_path, 10)
    assert path == tmp_path / "step-00000010"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"format": 1, "step": 10, "path": "step-00000010"}
    assert loaded_step(ckpt.validate(path)) == 10
    assert oct(path.stat().st_mode & 0o077) != "0o0"  # not mkdtemp's private 0700
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_file_is_rejected_and_the_previous_checkpoint_chosen(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    with open(newest / "model.safetensors", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ckpt.CheckpointError, match="bytes"):
        ckpt.validate(newest)
    assert ckpt.latest_complete(tmp_path).step == 1


@pytest.mark.parametrize("manifest", ["{not json", '{"path": "../../etc"}', '{"path": "step-00000099"}', None])
def test_bad_or_missing_manifest_falls_back_to_the_newest_complete(tmp_path, manifest):
    save(tmp_path, 1)
    save(tmp_path, 2)
    if manifest is None:
        (tmp_path / "latest.json").unlink()
    else:
        (tmp_path / "latest.json").write_text(manifest)
    assert ckpt.latest_complete(tmp_path).step == 2


def test_manifest_wins_over_a_stale_higher_step_from_an_older_run(tmp_path):
    save(tmp_path, 50)  # an earlier run in the same run dir got further
    save(tmp_path, 5)   # this run; latest.json names step 5
    assert ckpt.latest_complete(tmp_path).step == 5


def test_missing_state_file_or_extra_junk_is_not_a_checkpoint(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "notes").mkdir()
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == [1]


def test_same_bytes_different_content_fails_at_load_not_silently(tmp_path):
    path = save(tmp_path, 4)
    size = (path / "optimizer.safetensors").stat().st_size
    (path / "optimizer.safetensors").write_bytes(b"\xff" * size)
    with pytest.raises(ckpt.CheckpointError, match="cannot load"):
        ckpt.load(ckpt.validate(path))


def test_prune_keeps_the_newest_and_same_step_rewrite_replaces(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step-00000005", "step-00000004"]
    save(tmp_path, 5, keep=2)
    assert ckpt.latest_complete(tmp_path).step == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_clean_stale_removes_what_killed_writers_left(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ".tmp-step-00000002.abc").mkdir()
    (tmp_path / ".tmp-latest.json.xyz").write_text("{")
    (tmp_path / ".trash-step-00000000.1").mkdir()
    ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000001"]


def test_a_crash_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real_rename = os.rename

    def crash(src, dst):
        if Path(dst).name.startswith("step-"):
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 2)
    monkeypatch.setattr(os, "rename", real_rename)
    assert ckpt.latest_complete(tmp_path).step == 1
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step-00000001"]


def test_resolve_resume_accepts_latest_a_checkpoint_a_checkpoints_dir_or_a_run_dir(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.resolve_resume("latest", base=tmp_path / "run") == []
    save(root, 3)
    save(root, 6)
    assert ckpt.resolve_resume("latest", base=tmp_path / "run")[0].step == 6
    assert [c.step for c in ckpt.resolve_resume(str(root))] == [6, 3]
    assert ckpt.resolve_resume(str(tmp_path / "run"))[0].step == 6
    assert ckpt.resolve_resume(str(root / "step-00000003"))[0].step == 3
    (root / "step-00000003" / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):  # an explicit choice is never replaced
        ckpt.resolve_resume(str(root / "step-00000003"))
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"))


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import mlx.core as mx
    from orchestrator.runtime import checkpoint as ckpt

    root, step = Path(sys.argv[1]), int(sys.argv[2])
    while True:
        w = mx.full((256, 512), float(step))  # 512 KiB per file: kills often land mid-write
        ckpt.save(root, step, {"w": w}, {"m": w * 2, "step": mx.array(step, dtype=mx.uint64)},
                  {"epoch": 0, "offset": step}, keep=2)
        step += 1
""")


def test_killing_a_writer_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = tmp_path / "run" / "checkpoints"
    rng = random.Random(1234)
    next_step, saw_leftovers = 1, 0
    for _round in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(next_step)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not ckpt.step_dirs(root) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            assert proc.poll() is None, proc.stderr.read().decode()
        finally:
            kill_group(proc)
            proc.stderr.close()
        saw_leftovers += any(p.name.startswith(".tmp-") for p in root.iterdir())
        # Atomicity: every step-* directory there is complete, and so is what latest.json names.
        for path in ckpt.step_dirs(root):
            ckpt.validate(path)
        ckpt.validate(ckpt.read_manifest(root))
        # What --resume picks loads, with the content of its step.
        chosen = ckpt.resolve_resume("latest", base=root.parent)[0]
        assert chosen.path == ckpt.read_manifest(root)
        assert loaded_step(chosen) >= next_step - 1
        next_step = chosen.step + 1
        ckpt.clean_stale(root)  # what the trainer does on start
    assert next_step > 6
    print(f"kills that interrupted a write: {saw_leftovers}/6")


# ----------------------------------------------------------------------------- whose checkpoints pruning may delete


def test_pruning_never_deletes_another_runs_checkpoints(tmp_path, monkeypatch):
    """Two runs writing in one checkpoints/ (a continued run, or a writer without orch): each prunes only its own."""
    monkeypatch.setenv("ORCH_RUN_ID", "run-a")
    for step in (1, 2, 3):
        save(tmp_path, step, keep=2)
    monkeypatch.setenv("ORCH_RUN_ID", "run-b")
    for step in (4, 5, 6):
        save(tmp_path, step, keep=1)
    monkeypatch.setenv("ORCH_RUN_ID", "run-a")
    save(tmp_path, 7, keep=2)  # run a again, interleaved: prunes its own 2, never b's 6
    by_writer = {p.name: json.loads((p / ckpt.STATE_FILE).read_text())["run_id"] for p in ckpt.step_dirs(tmp_path)}
    assert by_writer == {"step-00000007": "run-a", "step-00000006": "run-b", "step-00000003": "run-a"}
    assert all(loaded_step(ckpt.validate(tmp_path / name)) for name in by_writer)


def test_checkpoints_without_a_writer_are_never_pruned(tmp_path, monkeypatch):
    """Checkpoints written before run ids existed (or with an unreadable state.json) are left alone."""
    old = save(tmp_path, 1)
    state = json.loads((old / ckpt.STATE_FILE).read_text())
    del state["run_id"]
    (old / ckpt.STATE_FILE).write_text(json.dumps(state))
    monkeypatch.setenv("ORCH_RUN_ID", "new")
    for step in (2, 3, 4):
        save(tmp_path, step, keep=1)
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step-00000004", "step-00000001"]


def test_without_orch_each_process_is_its_own_run(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCH_RUN_ID", raising=False)
    path = save(tmp_path, 1)
    assert json.loads((path / ckpt.STATE_FILE).read_text())["run_id"] == ckpt.current_run_id()
    code = ("import sys; from orchestrator.runtime import checkpoint as c; print(c.current_run_id())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "ORCH_RUN_ID"}).stdout.strip()
    assert other and other != ckpt.current_run_id()


# ----------------------------------------------------------------------------- durability on macOS


class _FakeFcntl:
    """macOS' fcntl as far as checkpoints use it: F_FULLFSYNC, and a spy on fcntl() calls."""

    F_FULLFSYNC = 51  # the value in macOS' <sys/fcntl.h>

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def fcntl(self, fd, cmd, *args):
        self.calls.append((fd, cmd))
        os.fstat(fd)  # a real, open descriptor
        if self.fail:
            raise OSError(45, "Operation not supported")
        return 0


def _spy_fsync(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


def test_checkpoints_use_f_fullfsync_where_it_exists(tmp_path, monkeypatch):
    fake = _FakeFcntl()
    monkeypatch.setattr(ckpt, "fcntl", fake)
    fsyncs = _spy_fsync(monkeypatch)
    save(tmp_path, 1)
    # model, optimizer, state.json, the checkpoint dir, the checkpoints dir, latest.json, the dir again
    assert len(fake.calls) >= 7 and {cmd for _, cmd in fake.calls} == {_FakeFcntl.F_FULLFSYNC}
    assert fsyncs == [], "with F_FULLFSYNC available, plain fsync is not used"


def test_without_f_fullfsync_support_it_falls_back_to_fsync(tmp_path, monkeypatch):
    fake = _FakeFcntl(fail=True)
    monkeypatch.setattr(ckpt, "fcntl", fake)
    fsyncs = _spy_fsync(monkeypatch)
    save(tmp_path, 1)
    assert len(fsyncs) == len(fake.calls) >= 7
    assert ckpt.latest_complete(tmp_path).step == 1


def test_linux_uses_plain_fsync(tmp_path, monkeypatch):
    import fcntl

    if hasattr(fcntl, "F_FULLFSYNC"):
        pytest.skip("this platform has F_FULLFSYNC")
    fsyncs = _spy_fsync(monkeypatch)
    save(tmp_path, 1)
    assert len(fsyncs) >= 7


def test_a_continued_run_keeps_the_first_runs_checkpoints(tmp_path):
    """Real `orch run`s: each run's --keep-checkpoints prunes its own; continuing in the same run dir keeps the first's."""
    from tests.orch_helpers import RECIPES, run_orch

    run_dir = tmp_path / "run"
    common = ["--checkpoint-every", "2", "--keep-checkpoints", "1", "--batch-size", "8"]
    first = run_orch("run", str(RECIPES / "mlp_regression.py"), "-n", "1", "--quiet", "--run-dir", str(run_dir),
                     "--", "--steps", "6", *common, cwd=tmp_path, timeout=180)
    assert first.returncode == 0, first.stderr
    second = run_orch("run", str(RECIPES / "mlp_regression.py"), "-n", "1", "--quiet", "--run-dir", str(run_dir),
                      "--", "--steps", "12", "--resume", *common, cwd=tmp_path, timeout=180)
    assert second.returncode == 0, second.stderr
    root = run_dir / "checkpoints"
    writers = {p.name: json.loads((p / ckpt.STATE_FILE).read_text())["run_id"] for p in ckpt.step_dirs(root)}
    assert list(writers) == ["step-00000012", "step-00000006"], writers
    assert len(set(writers.values())) == 2, "each orch run has its own id"
    assert ckpt.latest_complete(root).step == 12
    # The first run's records were set aside, not appended to: each summary and events.jsonl is one run's.
    earlier = run_dir / "previous" / "1"
    assert f"--run-dir held an earlier run: its summary, events and logs are now in {earlier}" in second.stderr
    assert json.loads((earlier / "summary.json").read_text())["ranks"][0]["steps"] == 6
    assert json.loads((run_dir / "summary.json").read_text())["ranks"][0]["steps"] == 12
    for d, last in ((earlier, 6), (run_dir, 12)):
        steps = [e["step"] for e in map(json.loads, (d / "events.jsonl").read_text().splitlines()) if e["kind"] == "step"]
        assert max(steps) == last and (d is earlier or min(steps) == 7), steps
        assert (d / "logs" / "rank-0.log").exists()
