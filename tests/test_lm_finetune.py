"""recipes/lm_finetune.py: a real mlx-lm model fine-tuned under orch's runtime, at every sharding stage.

Real ranks through ``orch run -n N`` on the tiny local Llama of ``tests/mlxlm_fixture.py`` (no network).
N ranks x batch b see, step for step, the samples that 1 rank x batch N*b sees (``runtime/data.py``), and
the recipe's loss is a per-sample mean, so at every stage the loss trajectory must be the 1-rank run's
(within 1e-3), the saved weights the same, and what was saved must load and generate in
``python -m mlx_lm generate``. Kept cheap: 4 steps of a 2-layer, 32-wide model; each stage is one
``orch run`` (the stages differ in what the trainer builds, so they are not folded into one run); the
4-rank runs (slow on 2 cores: the ring's ranks outnumber the cores) are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import mlxlm_fixture
from tests.orch_helpers import RECIPES, events, run_orch

RECIPE = RECIPES / "lm_finetune.py"
STEPS = 4
GLOBAL_BATCH = 4  # 1 rank x 4 == 2 ranks x 2 == 4 ranks x 1
LOSS_TOL = 1e-3
WEIGHT_TOL = 1e-4
SAVED = {"lora": ("adapters", "adapters.safetensors"), "full": ("model", "model.safetensors")}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return mlxlm_fixture.build(tmp_path_factory.mktemp("lmft") / "fx")


def _env(extra: dict | None = None) -> dict:
    return {**mlxlm_fixture.OFFLINE_ENV, **(extra or {})}


def finetune(fx, run_dir: Path, n: int, kind: str, *args: str, env: dict | None = None) -> dict:
    """One real ``orch run -n N`` of the recipe; rank 0's losses, metrics, stdout and what it saved."""
    r = run_orch("run", str(RECIPE), "-n", str(n), "--run-dir", str(run_dir), "--",
                 "--model", str(fx.model), "--data", str(fx.data), "--fine-tune-type", kind, "--num-layers", "-1",
                 "--steps", str(STEPS), "--batch-size", str(GLOBAL_BATCH // n), "--lr", "1e-3",
                 "--no-memory-check", "--stats-every", "0", *args,
                 cwd=run_dir.parent, env=_env(env), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = [e for e in events(run_dir) if e.get("rank") == 0]
    losses = [e["loss"] for e in ev if e["kind"] == "step"]
    assert len(losses) == STEPS, r.stdout[-2000:]
    saved = run_dir / SAVED[kind][0]
    # Named relative to the run directory: over SSH the rank's own copy is retired once collected home.
    assert f"saved {SAVED[kind][0]}/ in the run directory (load it with: mlx_lm generate --model " in r.stdout
    assert f" RUN_DIR/{SAVED[kind][0]}; RUN_DIR: the one orch names at the end)" in r.stdout
    return {"losses": losses, "metrics": [e for e in ev if e["kind"] == "metric"][-1]["values"],
            "stdout": r.stdout, "saved": saved, "weights": _load(saved / SAVED[kind][1])}


def _load(path: Path) -> dict:
    import mlx.core as mx

    return {k: v.astype(mx.float32) for k, v in mx.load(str(path)).items()}


def _max_diff(a: dict, b: dict) -> float:
    import mlx.core as mx

    assert sorted(a) == sorted(b)
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


@pytest.fixture(scope="module")
def reference(fx, tmp_path_factory):
    """The unsharded single-rank run (batch 4) of each fine-tune type, made once when first asked for."""
    runs: dict = {}

    def get(kind: str) -> dict:
        if kind not in runs:
            runs[kind] = finetune(fx, tmp_path_factory.mktemp(f"ref-{kind}") / "run", 1, kind)
        return runs[kind]

    return get


def generate(*args: str) -> str:
    """``python -m mlx_lm generate`` on what a run saved: it must load and produce tokens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "ORCH_"))}
    r = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", *args, "--prompt", "the cat",
                        "--max-tokens", "4"], env={**env, **_env()}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    produced = re.search(r"Generation: (\d+) tokens", r.stdout)
    assert produced and int(produced.group(1)) > 0, r.stdout
    text = r.stdout.split("==========")[1].strip()
    assert text, r.stdout
    return text


def _same_as_reference(fx, run: dict, ref: dict, kind: str) -> float:
    """The run's losses are the 1-rank run's, and so is what it saved: the trained weights, not the initial
    ones (a full model's differ from the fixture's; LoRA's ``lora_b`` starts at zero in mlx-lm)."""
    diffs = [abs(a - b) for a, b in zip(run["losses"], ref["losses"])]
    assert max(diffs) < LOSS_TOL, (run["losses"], ref["losses"])
    assert _max_diff(run["weights"], ref["weights"]) < WEIGHT_TOL
    if kind == "full":
        assert _max_diff(run["weights"], _load(fx.model / "model.safetensors")) > 1e-4
    else:
        assert max(abs(v).max().item() for k, v in run["weights"].items() if k.endswith("lora_b")) > 1e-4
    return max(diffs)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("n", "kind"), [(2, "lora"), pytest.param(4, "full", marks=pytest.mark.slow)])
def test_every_sharding_stage_trains_like_one_rank_and_saves_what_mlx_lm_generates_from(
        fx, reference, tmp_path, n, kind):
    ref = reference(kind)
    runs = {stage: finetune(fx, tmp_path / stage, n, kind, "--shard", stage)
            for stage in ("none", "optimizer", "full")}
    diffs = {stage: _same_as_reference(fx, run, ref, kind) for stage, run in runs.items()}
    print(f"max |loss - 1-rank loss| over {STEPS} steps at {n} ranks ({kind}): {diffs}")
    # Each stage did shard what it says: ZeRO-1 1/N of the optimizer state; full: the layers gathered.
    state = {stage: run["metrics"]["optimizer_state_bytes"] for stage, run in runs.items()}
    assert state["optimizer"] < state["none"]
    if kind == "full":
        assert state["full"] < state["none"] and runs["full"]["metrics"]["shard_gather_bytes_per_step"] > 0
    else:  # LoRA: the frozen base layers are sharded; the adapters stay whole on every rank (rank 0 says so)
        assert "stay whole on every rank" in runs["full"]["stdout"] and "lora_a" in runs["full"]["stdout"]
        metrics = runs["full"]["metrics"]  # the frozen shards are gathered every step, and counted
        assert metrics["shard_gather_bytes_per_step"] > 0 and metrics["shard_scatter_bytes_per_step"] == 0
    saved = runs["full"]["saved"]
    if kind == "full":
        assert json.loads((saved / "config.json").read_text())["model_type"] == "llama"
        generate("--model", str(saved))
    else:
        config = json.loads((saved / "adapter_config.json").read_text())
        assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
        generate("--model", str(fx.model), "--adapter-path", str(saved))


@pytest.mark.timeout(300)
def test_shard_auto_picks_a_stage_and_full_fine_tuning_saves_a_model_directory(fx, reference, tmp_path):
    """A 1-byte budget makes --shard auto pick full; the saved directory is a whole mlx-lm model."""
    ref = reference("full")
    run = finetune(fx, tmp_path / "auto", 2, "full", "--shard", "auto", env={"ORCH_MEMORY_BUDGET_BYTES": "1"})
    assert "--shard auto: full (" in run["stdout"]
    print(f"max |loss - 1-rank loss| at 2 ranks, --shard auto (full): {_same_as_reference(fx, run, ref, 'full')}")
    generate("--model", str(run["saved"]))


def _recipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "ORCH_"))}
    return subprocess.run([sys.executable, str(RECIPE), *args], cwd=cwd, env={**env, **_env()},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_bad_input_is_one_line_and_exit_2(fx, tmp_path):
    missing = tmp_path / "no-data"
    r = _recipe("--model", str(fx.model), "--data", str(missing), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, f"lm_finetune: --data {missing}: no such directory\n")
    r = _recipe("--model", str(fx.data), "--data", str(fx.data), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, f"lm_finetune: --model {fx.data}: no config.json in it "
                                           "(a local mlx-lm model directory)\n")
    r = _recipe("--model", str(fx.model), "--data", str(fx.data), "--num-layers", "0", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, "lm_finetune: --num-layers 0: give a number of blocks >= 1, "
                                           "or -1 for all\n")
    r = _recipe("--model", str(fx.model), "--data", str(fx.data), "--fine-tune-type", "dora", "--shard", "full",
                cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "use --shard none or optimizer" in r.stderr, r.stderr
    # Under orch: rank 0 says it in one line, every rank stops before joining the group; the others say
    # nothing and wait to be stopped, so orch names rank 0 (its last line is the one) and exits 2.
    r = run_orch("run", str(RECIPE), "-n", "2", "--run-dir", str(tmp_path / "run"), "--", "--model", str(fx.model),
                 "--data", str(missing), cwd=tmp_path, env=_env(), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    said = f"lm_finetune: --data {missing}: no such directory"
    assert f"[0] {said}" in r.stderr and f"last lines of rank 0:\n    {said}\n" in r.stderr, r.stderr
    assert "[1] " not in r.stdout + r.stderr and "rank 1 failed" not in r.stderr, r.stderr


def _module():
    sys.path.insert(0, str(RECIPES))
    try:
        import lm_finetune
    finally:
        sys.path.remove(str(RECIPES))
    return lm_finetune


def test_empty_data_files_are_one_line_naming_the_file(fx, tmp_path):
    """mlx-lm fails on ``data[0]`` (IndexError) for an empty file: the recipe says which file, before loading."""
    lm = _module()
    for name, fix in (("train.jsonl", "put one JSON object per line in it"), ("valid.jsonl", "or remove it")):
        data = tmp_path / name
        data.mkdir()
        (data / "train.jsonl").write_text("" if name == "train.jsonl" else (fx.data / "train.jsonl").read_text())
        (data / name).write_text(" \n\n")
        hp = lm.parse_hparams(lm.Config, ["--model", str(fx.model), "--data", str(data)])
        with pytest.raises(lm.BadInput, match=f"^--data {data}: {name} is empty: .*{fix}"):
            lm.check_paths(hp)


def test_mlx_lm_lora_defaults_and_names_carry_over(fx, monkeypatch):
    """--num-layers 16 (the default) on a 2-block model trains both, as mlx_lm.lora does; --iters is --steps."""
    lm = _module()
    hp = lm.parse_hparams(lm.Config, lm.argv_with_aliases(["--model", str(fx.model), "--data", str(fx.data),
                                                           "--iters", "7"]))
    assert hp.steps == 7 and hp.num_layers == 16
    assert lm.parse_hparams(lm.Config, lm.argv_with_aliases(["--iters=5"])).steps == 5
    job = lm.FineTune(hp)
    assert job.trained_blocks() == 2
    model, _ = job.build(hp)
    assert all(any("lora_a" in k for k, _ in lm.tree_flatten(block.trainable_parameters())) for block in model.layers)


def test_saved_path_is_named_relative_to_the_run_directory(tmp_path, monkeypatch):
    lm = _module()
    how = "mlx_lm generate --model m --adapter-path {path}"
    monkeypatch.setenv("ORCH_RUN_DIR", str(tmp_path / "run"))
    assert lm.saved_line(tmp_path / "run" / "adapters", how) == (
        "saved adapters/ in the run directory (load it with: mlx_lm generate --model m --adapter-path "
        "RUN_DIR/adapters; RUN_DIR: the one orch names at the end)")
    assert lm.saved_line(tmp_path / "elsewhere", how) == (
        f"saved {tmp_path / 'elsewhere'} (load it with: mlx_lm generate --model m --adapter-path {tmp_path}/elsewhere)")
    monkeypatch.delenv("ORCH_RUN_DIR")
    assert lm.saved_line(Path("runs/local/model"), "x {path}") == "saved runs/local/model (load it with: x runs/local/model)"


def test_resume_from_another_configuration_is_one_line_before_loading(fx, tmp_path, monkeypatch, capsys):
    """A checkpoint of LoRA rank 8 resumed at rank 4 or as full fine-tuning: one line saying what differs,
    exit 2; a checkpoint of another recipe is compared by its arrays' names and shapes; the same
    configuration passes."""
    from orchestrator.runtime import checkpoint as ckpt
    from orchestrator.runtime.config import to_dict

    lm = _module()
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "ORCH_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    base = ["--model", str(fx.model), "--data", str(fx.data)]
    hp = lm.parse_hparams(lm.Config, base)
    model, _ = lm.FineTune(hp).build(hp)
    arrays = dict(lm.tree_flatten(model.parameters()))
    ours = ckpt.save(tmp_path / "ours", 2, arrays, {}, {"recipe": "lm_finetune", "hparams": to_dict(hp)})
    other = ckpt.save(tmp_path / "other", 2, arrays, {}, {"recipe": "another", "hparams": {}})

    def resumed(path, *args):
        hp = lm.parse_hparams(lm.Config, [*base, "--resume", str(path), *args])
        job = lm.FineTune(hp)
        with pytest.raises(SystemExit) as stopped:
            job.build(hp)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1, err
        return err

    assert resumed(ours, "--lora-rank", "4").endswith(
        "the checkpoint holds LoRA adapters of rank 8; this run asks for rank 4\n")
    assert resumed(ours, "--fine-tune-type", "full").endswith(
        "the checkpoint holds LoRA adapters of rank 8; this run asks for the whole blocks' weights "
        "(--fine-tune-type full)\n")
    assert resumed(ours, "--num-layers", "1").endswith(
        "the checkpoint trained the last 2 block(s) (--num-layers 16); this run asks for 1 (--num-layers 1)\n")
    err = resumed(other, "--lora-rank", "4")
    assert err.startswith(f"lm_finetune: --resume {other}: {other}: the checkpoint was written for another model "
                          "or configuration: ") and "of another shape (e.g. " in err and "lora_a: [" in err, err
    hp = lm.parse_hparams(lm.Config, [*base, "--resume", str(ours), "--batch-size", "3"])
    job = lm.FineTune(hp)
    job.build(hp)  # the same configuration: nothing to say
    assert capsys.readouterr().err == ""
    # Resumed at another world size / batch: rank 0 says the global batch changed, once.
    world = ckpt.save(tmp_path / "world", 2, arrays, {}, {"recipe": "lm_finetune", "world_size": 2,
                                                           "hparams": {**to_dict(hp), "batch_size": 4}})
    for rank, resumed_from, out in ((0, world, "[lm_finetune] resumed at 3 rank(s): global batch 9 samples/step, "
                                               "was 8 (2 rank(s) x --batch-size 4 x --grad-accum 1)\n"),
                                    (1, world, ""), (0, None, "")):
        job.say_resumed_batch(SimpleNamespace(rank=rank, world=3, resumed_from=resumed_from))
        assert capsys.readouterr().out == out


def test_completions_with_mask_prompt_train_only_on_the_completion(fx, tmp_path):
    """mlx-lm's completions format through its own dataset classes: the prompt's tokens carry no loss."""
    import shutil

    import mlx.core as mx
    import mlx.nn as nn

    lm_finetune = _module()
    model = tmp_path / "model"
    shutil.copytree(fx.model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    data.mkdir()
    lines = [{"prompt": "the cat sees", "completion": "the red ball ."},
             {"prompt": "a dog", "completion": "likes some warm bread at home ."}]
    (data / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    hp = lm_finetune.parse_hparams(lm_finetune.Config, ["--model", str(model), "--data", str(data),
                                                        "--mask-prompt", "--num-layers", "-1"])
    job = lm_finetune.FineTune(hp)
    tokens, lengths = job.train[[0, 1]]
    assert lengths.tolist() == [[3, 7], [2, 9]]  # (prompt tokens, all tokens): word-level, a space after each
    assert tokens.shape == (2, 9) and tokens[0, 7:].tolist() == [0, 0]
    model_, _ = job.build(hp)
    loss = lm_finetune.loss_fn(model_, mx.array(tokens), mx.array(lengths)).item()
    # By hand: target i is token i + 1; sample 0 trains on tokens 3..6 (targets 2..5), sample 1 on 2..8.
    ce = nn.losses.cross_entropy(model_(mx.array(tokens[:, :-1])), mx.array(tokens[:, 1:]))
    expected = (ce[0, 2:6].mean() + ce[1, 1:8].mean()).item() / 2
    assert abs(loss - expected) < 1e-6
    whole = lm_finetune.loss_fn(model_, mx.array(tokens), mx.array([[0, 7], [0, 9]])).item()
    assert abs(whole - (ce[0, :6].mean() + ce[1, :8].mean()).item() / 2) < 1e-6 and abs(whole - loss) > 1e-4
