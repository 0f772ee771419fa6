"""Fine-tune a language model that mlx-lm loads, under orch's runtime, with any sharding stage.

    orch run recipes/lm_finetune.py -n 2 -- --model ./model --data ./data --num-layers -1
    orch run recipes/lm_finetune.py --hostfile H -- --model ./model --data ./data --shard auto
    orch run recipes/lm_finetune.py -n 4 -- --model ./model --data ./data --fine-tune-type full --shard full

Everything model- and data-specific is mlx-lm's own code, called, not copied:

* the model and tokenizer come from ``mlx_lm.utils.load`` (any architecture mlx-lm loads, from a local
  directory: ranks on other hosts need the same path, e.g. through ``orch stage``);
* the data from ``mlx_lm.tuner.datasets.load_dataset``: ``train.jsonl`` (and ``valid.jsonl`` if there)
  of text, chat or prompt/completion lines, as ``mlx_lm.lora`` reads them, tokenized lazily by its
  ``CacheDataset``; ``--mask-prompt`` trains on the completion only;
* LoRA / DoRA through ``mlx_lm.tuner.utils.linear_to_lora_layers`` on the last ``--num-layers`` blocks
  (-1: all; more than the model has: all, as in ``mlx_lm.lora``, whose ``--iters`` is taken for ``--steps``), and ``--fine-tune-type full`` unfreezes those blocks, as ``mlx_lm.lora`` does (DoRA not
  with ``--shard full|auto``: it reads its base layer's weight outside the layer's call, and
  ``--shard full`` keeps a layer whole only inside its call);
* what is saved is what ``mlx_lm generate`` loads: LoRA/DoRA adapters (``adapters.safetensors`` +
  ``adapter_config.json``, for ``--adapter-path``), or, for full fine-tuning, a whole model directory
  written by ``mlx_lm.utils.save`` (for ``--model``). Default place: ``RUN_DIR/adapters`` or
  ``RUN_DIR/model``; ``--save-path`` elsewhere. Over SSH the rank's run directory is a remote copy that
  orch collects home and then retires, so a save inside it is named relative to the run directory.

Bad input is one line from rank 0, exit 2 (the other ranks exit 2 without a word, so orch names rank 0):
the paths and files before the ranks connect, and a ``--resume`` checkpoint written by another
configuration (another fine-tune type, LoRA rank, number of blocks or model) before it is loaded.

The training itself is the runtime's (``orchestrator.runtime.Trainer``): data sharded by rank, the
gradient all-reduce, checkpoints, ``--resume``, and ``--shard none|optimizer|full|auto``. Sharded runs
save the same files: with ``--shard full`` rank 0 saves inside the trainer's ``unsharded()`` (every
rank gathers the layers for it), as it evaluates.

The loss is the mean over samples of each sample's mean token cross-entropy, not mlx-lm's mean over
all of a batch's tokens: the runtime averages the ranks' losses with equal weights, and only a
per-sample mean makes N ranks x batch b train exactly like 1 rank x batch N*b, whatever the lengths
of each rank's samples. A batch is padded to its longest sample (at most ``--max-seq-length``); the
padding is masked out and, the attention being causal, changes nothing before it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from orchestrator import protocol
from orchestrator.runtime import Hparams, Recipe, Trainer, init_group, optimizer_from, parse_hparams
from orchestrator.runtime import checkpoint as ckpt
from orchestrator.runtime.checkpoint import run_dir
from orchestrator.runtime.events import rank as env_rank
from orchestrator.runtime.shard import FullShard

NAME = "lm_finetune"
OTHER_RANKS_WAIT_S = 10.0  # bad input: how long ranks other than 0 wait for orch to stop them (``stop``)
FINE_TUNE_TYPES = ("lora", "dora", "full")


@dataclass
class Config(Hparams):
    """Fine-tune an mlx-lm model directory on mlx-lm jsonl data (see recipes/lm_finetune.py)."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-5
    model: str = field(default="", metadata={"help": "a local model directory that mlx_lm.utils.load reads"})
    data: str = field(default="", metadata={
        "help": "a local directory with train.jsonl (valid.jsonl optional): text, chat or completions lines"})
    fine_tune_type: str = field(default="lora", metadata={
        "help": "lora | dora: adapters; full: the blocks' own weights", "choices": FINE_TUNE_TYPES})
    num_layers: int = field(default=16, metadata={
        "help": "blocks trained, counted from the last (-1, or more than the model has: all)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA/DoRA rank"})
    lora_scale: float = field(default=20.0, metadata={"help": "LoRA/DoRA scale"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA/DoRA dropout"})
    mask_prompt: bool = field(default=False, metadata={
        "help": "chat/completions data: no loss on the prompt, only on the last (assistant) message"})
    max_seq_length: int = field(default=2048, metadata={"help": "longer samples are truncated"})
    save_path: str = field(default="", metadata={
        "help": "where the adapters (or, --fine-tune-type full, the model directory) go; "
                "default RUN_DIR/adapters or RUN_DIR/model"})


class BadInput(Exception):
    """A problem with the command line or the files it names: one line, exit 2."""


# ----------------------------------------------------------------------------- data


class TokenBatches:
    """mlx-lm's processed samples as the runtime's dataset: ``batch[indices] -> (tokens, lengths)``.

    ``tokens`` is ``(B, L)`` int32, padded with zeros to the batch's longest sample (truncated at
    ``max_len``); ``lengths`` is ``(B, 2)``: mlx-lm's ``(offset, length)``, where ``offset`` is the
    number of prompt tokens that are not trained on.
    """

    def __init__(self, dataset: Any, max_len: int) -> None:
        from mlx_lm.tuner.datasets import CacheDataset

        self.items, self.max_len = CacheDataset(dataset), max_len

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        samples = [self.items[int(i)] for i in np.asarray(indices).reshape(-1)]
        lengths = [min(len(tokens), self.max_len) for tokens, _ in samples]
        tokens = np.zeros((len(samples), max(2, *lengths)), dtype=np.int32)
        for row, ((seq, _), n) in enumerate(zip(samples, lengths)):
            tokens[row, :n] = seq[:n]
        return tokens, np.array([[offset, n] for (_, offset), n in zip(samples, lengths)], dtype=np.int32)


def loss_fn(model: nn.Module, tokens: mx.array, lengths: mx.array) -> mx.array:
    """Mean over samples of the mean cross-entropy of each sample's trained tokens (module doc: why).

    Target ``i`` is token ``i + 1`` of its sample; it is trained on if ``offset <= i + 1 < length``
    (mlx-lm's ``default_loss`` also counts ``i + 1 == length``, a padding token after the sample's end).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs).astype(mx.float32)
    position = mx.arange(1, targets.shape[1] + 1)
    mask = (position >= lengths[:, :1]) & (position < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return (ce.sum(axis=1) / mx.maximum(mask.sum(axis=1), 1)).mean()


# ----------------------------------------------------------------------------- the job


class FineTune:
    """The loaded model, tokenizer and data of one run, and the recipe's parts that use them."""

    def __init__(self, hp: Config) -> None:
        check_paths(hp)
        from mlx_lm.tuner.datasets import load_dataset
        from mlx_lm.utils import load

        try:
            self.model, self.tokenizer, self.config = load(hp.model, return_config=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise BadInput(f"--model {hp.model}: mlx-lm cannot load it: {_one_line(e)}") from None
        if hp.num_layers < -1 or hp.num_layers == 0:
            raise BadInput(f"--num-layers {hp.num_layers}: give a number of blocks >= 1, or -1 for all")
        args = SimpleNamespace(data=hp.data, train=True, test=False, mask_prompt=hp.mask_prompt)
        try:
            # mlx-lm's notes ("no validation set") are said after the checks, by rank 0 only (``main``).
            with contextlib.redirect_stdout(io.StringIO()) as notes:
                train, valid, _ = load_dataset(args, self.tokenizer)
            self.notes = notes.getvalue().strip()
            self.train = TokenBatches(train, hp.max_seq_length)
            self.valid = TokenBatches(valid, hp.max_seq_length) if len(valid) else None
            if len(self.train):
                self.train[np.array([0])]  # tokenizes one sample now: a format problem is bad input
        except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as e:
            raise BadInput(f"--data {hp.data}: {_one_line(e)}") from None
        self.hp = hp
        self.group: Optional[mx.distributed.Group] = None  # set by ``main`` once the ranks are connected

    def trained_blocks(self) -> int:
        """How many blocks ``--num-layers`` trains: -1 or more than the model has is all of them."""
        layers = len(self.model.layers)
        return layers if self.hp.num_layers < 0 else min(self.hp.num_layers, layers)

    def build(self, hp: Config):
        """Freeze the model, then LoRA/DoRA layers (seeded by the trainer: the same on every rank) or the
        last blocks unfrozen, exactly as ``mlx_lm.lora`` does it."""
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model = self.model
        model.freeze()
        if hp.fine_tune_type == "full":
            for block in model.layers[-max(hp.num_layers, 0):]:
                block.unfreeze()
        else:
            linear_to_lora_layers(model, hp.num_layers, self.lora_parameters(),
                                  use_dora=hp.fine_tune_type == "dora")
        model.train()
        if hp.resume is not None:  # every rank builds here: rank 0 checks, all agree (a collective)
            problem = self.resume_problem(model) if (self.group is None or self.group.rank() == 0) else None
            if self.group is not None and self.group.size() > 1:
                problem_anywhere = mx.distributed.all_sum(mx.array(int(problem is not None)), group=self.group)
                if problem_anywhere.item() and problem is None:
                    stop("")
            if problem is not None:
                stop(problem)
        return model, optimizer_from(hp)

    def resume_problem(self, model: nn.Module) -> Optional[str]:
        """Rank 0, before the trainer loads ``--resume``: how the checkpoint it will pick differs from the
        model just built, in one line, or None. The recipe's own hyper-parameters in the checkpoint's
        state say it in the user's terms; any other difference is named from the arrays' names and
        shapes, read from the safetensors header alone (no array is loaded). A checkpoint that cannot
        be found or read is left to the trainer, which says so."""
        hp = self.hp
        try:
            found = ckpt.resolve_resume(hp.resume)
        except ckpt.CheckpointError:
            return None
        if not found:
            return None
        state, path = found[0].state, found[0].path
        then = state.get("hparams") if state.get("recipe") == NAME else None
        where = f"--resume {hp.resume}: {path}"
        if isinstance(then, dict):
            said = _config_difference(then, hp, self.trained_blocks(), len(self.model.layers))
            if said:
                return f"{where}: {said}"
        try:
            names = _safetensors_shapes(path / ckpt.MODEL_FILE)
        except (OSError, ValueError, struct.error):
            return None
        here = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        missing, extra = sorted(set(here) - set(names)), sorted(set(names) - set(here))
        reshaped = sorted(k for k in set(here) & set(names) if here[k] != names[k])
        if not (missing or extra or reshaped):
            return None
        parts = ([f"{len(missing)} parameter(s) of this model not in it (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} it holds that this model lacks (e.g. {extra[0]})"] if extra else []) + \
                ([f"{len(reshaped)} of another shape (e.g. {reshaped[0]}: {list(names[reshaped[0]])} in it, "
                  f"{list(here[reshaped[0]])} here)"] if reshaped else [])
        return f"{where}: the checkpoint was written for another model or configuration: " + "; ".join(parts)

    def lora_parameters(self) -> dict:
        return {"rank": self.hp.lora_rank, "scale": self.hp.lora_scale, "dropout": self.hp.lora_dropout}

    def data(self, hp: Config) -> TokenBatches:
        return self.train

    def evaluate(self, model: nn.Module, hp: Config) -> dict:
        """Rank 0: the loss on valid.jsonl (the training loss's definition); only where there is one."""
        assert self.valid is not None
        model.eval()
        total, n = 0.0, len(self.valid)
        for start in range(0, n, hp.batch_size):
            idx = np.arange(start, min(start + hp.batch_size, n))
            tokens, lengths = self.valid[idx]
            total += loss_fn(model, mx.array(tokens), mx.array(lengths)).item() * len(idx)
        model.train()
        loss = total / n
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def say_resumed_batch(self, trainer: Trainer) -> None:
        """Rank 0: a resumed run whose global batch differs from the checkpoint's (another world size,
        --batch-size or --grad-accum) says so, once: the step count continues but a step is not the same."""
        if trainer.rank != 0 or trainer.resumed_from is None:
            return
        try:
            state = ckpt.validate(trainer.resumed_from).state
            then = state["hparams"]
            was = int(state["world_size"]) * int(then["batch_size"]) * int(then["grad_accum"])
        except (ckpt.CheckpointError, KeyError, TypeError, ValueError):
            return
        hp = self.hp
        now = trainer.world * hp.batch_size * hp.grad_accum
        if now != was:
            print(f"[{NAME}] resumed at {trainer.world} rank(s): global batch {now} samples/step, was {was} "
                  f"({state['world_size']} rank(s) x --batch-size {then['batch_size']} x --grad-accum "
                  f"{then['grad_accum']})", flush=True)

    def save(self, trainer: Trainer) -> Optional[Path]:
        """What ``mlx_lm generate`` loads, written by rank 0 from the whole model (a collective when
        ``--shard full``: every rank gathers the layers for it)."""
        hp = self.hp
        path = Path(hp.save_path) if hp.save_path else run_dir() / ("model" if hp.fine_tune_type == "full"
                                                                  else "adapters")
        whole = trainer.sharded.unsharded() if isinstance(trainer.sharded, FullShard) else contextlib.nullcontext()
        with whole:
            if trainer.rank != 0:
                return None
            model = trainer.model
            if hp.fine_tune_type == "full":
                from mlx_lm.utils import save

                save(path, hp.model, model, self.tokenizer, dict(self.config), donate_model=False)
                how = "mlx_lm generate --model {path}"
            else:
                from mlx_lm.utils import save_config

                path.mkdir(parents=True, exist_ok=True)
                mx.save_safetensors(str(path / "adapters.safetensors"),
                                    dict(tree_flatten(model.trainable_parameters())), metadata={"format": "mlx"})
                save_config({"model": hp.model, "data": hp.data, "fine_tune_type": hp.fine_tune_type,
                             "num_layers": hp.num_layers, "lora_parameters": self.lora_parameters(),
                             "steps": hp.steps, "batch_size": hp.batch_size, "lr": hp.lr, "seed": hp.seed,
                             "max_seq_length": hp.max_seq_length, "mask_prompt": hp.mask_prompt},
                            path / "adapter_config.json")
                how = "mlx_lm generate --model " + hp.model + " --adapter-path {path}"
        print(f"[{NAME}] {saved_line(path, how)}", flush=True)
        return path


def saved_line(path: Path, how: str) -> str:
    """Where the save went, in words that hold after the run: inside orch's rank run directory (over SSH a
    remote copy, collected home to the controller's run directory and then retired; locally the run
    directory itself) the path is given relative to the run directory, which orch names when the run
    ends; a path elsewhere is given as it is (on rank 0's host). ``how`` has ``{path}`` to fill in."""
    root = os.environ.get(protocol.ENV_RUN_DIR)
    if root:
        try:
            inside = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            inside = None
        if inside is not None:
            load = how.replace("{path}", str(Path("RUN_DIR") / inside))
            return f"saved {inside}/ in the run directory (load it with: {load}; RUN_DIR: the one orch names at the end)"
    load = how.replace("{path}", str(path))
    return f"saved {path} (load it with: {load})"


def _config_difference(then: dict, hp: Config, blocks: int, layers: int) -> Optional[str]:
    """What the checkpoint's recipe settings (``then``) and this run's differ in, in one phrase, or None."""
    def kind(cfg_type: Any, rank: Any) -> str:
        return "the whole blocks' weights (--fine-tune-type full)" if cfg_type == "full" else \
            f"{'DoRA' if cfg_type == 'dora' else 'LoRA'} adapters of rank {rank}"
    old_type, old_rank = then.get("fine_tune_type"), then.get("lora_rank")
    if old_type != hp.fine_tune_type or (hp.fine_tune_type != "full" and old_rank != hp.lora_rank):
        asks = (f"rank {hp.lora_rank}" if old_type == hp.fine_tune_type else kind(hp.fine_tune_type, hp.lora_rank))
        return f"the checkpoint holds {kind(old_type, old_rank)}; this run asks for {asks}"
    old_n = then.get("num_layers")
    if isinstance(old_n, int):
        old_blocks = layers if old_n < 0 else min(old_n, layers)
        if old_blocks != blocks:
            return (f"the checkpoint trained the last {old_blocks} block(s) (--num-layers {old_n}); this run asks "
                    f"for {blocks} (--num-layers {hp.num_layers})")
    return None  # the rest (another model, say) is for the arrays' names and shapes to tell


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    """``{name: shape}`` from a safetensors file's header (8-byte length, then JSON), without its arrays."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def stop(message: str) -> None:
    """Bad input: rank 0 says it in one line, every rank exits 2. The other ranks wait (bounded) to be
    stopped by orch first: orch names the rank that exited first, and shows its last lines, which are
    then rank 0's one line, not an empty tail. Outside orch they exit 2 at once."""
    if env_rank() == 0:
        if message:
            print(f"{NAME}: {message}", file=sys.stderr, flush=True)
    elif os.environ.get(protocol.ENV_EVENTS) == "1":
        time.sleep(OTHER_RANKS_WAIT_S)
    raise SystemExit(2)


def argv_with_aliases(argv: Optional[list[str]]) -> list[str]:
    """``mlx_lm.lora``'s ``--iters`` for ``--steps``, so its command lines carry over."""
    args = list(sys.argv[1:] if argv is None else argv)
    return ["--steps" if a == "--iters" else "--steps=" + a[len("--iters="):] if a.startswith("--iters=") else a
            for a in args]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def check_paths(hp: Config) -> None:
    """The local directories mlx-lm will read; mlx-lm itself would try the Hugging Face Hub instead."""
    model, data = Path(hp.model).expanduser(), Path(hp.data).expanduser()
    if not hp.model:
        raise BadInput("--model is required: a local mlx-lm model directory")
    if not (model / "config.json").is_file():
        raise BadInput(f"--model {hp.model}: " + ("no config.json in it" if model.is_dir() else
                                                  "no such directory") + " (a local mlx-lm model directory)")
    if not hp.data:
        raise BadInput("--data is required: a directory with train.jsonl (valid.jsonl optional)")
    if not (data / "train.jsonl").is_file():
        raise BadInput(f"--data {hp.data}: " + ("no train.jsonl in it" if data.is_dir() else "no such directory"))
    for name, fix in (("train.jsonl", "put one JSON object per line in it (text, chat or prompt/completion)"),
                      ("valid.jsonl", "give it samples, or remove it (validation is optional)")):
        if (data / name).is_file() and _blank(data / name):
            raise BadInput(f"--data {hp.data}: {name} is empty: {fix}")
    if hp.max_seq_length < 2:
        raise BadInput("--max-seq-length must be >= 2")
    if hp.fine_tune_type == "dora" and hp.shard in ("full", "auto"):
        raise BadInput(f"--fine-tune-type dora with --shard {hp.shard}: DoRA reads its base layer's weight outside the "
                       "layer's call, where --shard full keeps it sharded; use --shard none or optimizer, or lora")


def _blank(path: Path) -> bool:
    """No sample at all (mlx-lm would fail on ``data[0]``): nothing but whitespace, read until the first
    character that is not."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def main(argv: Optional[list[str]] = None) -> None:
    hp = parse_hparams(Config, argv_with_aliases(argv), prog=NAME)
    try:
        job = FineTune(hp)
    except BadInput as e:
        stop(str(e))
    group = init_group()
    job.group = group
    needed = group.size() * hp.batch_size * hp.grad_accum
    if len(job.train) < needed:  # every rank sees the same: all stop, none waits in a collective
        stop(f"--data {hp.data}: train.jsonl has {len(job.train)} sample(s), one step needs {needed} "
             f"({group.size()} rank(s) x --batch-size {hp.batch_size} x --grad-accum {hp.grad_accum})")
    if job.notes and group.rank() == 0:
        print(f"[{NAME}] mlx-lm: {job.notes}", flush=True)
    recipe = Recipe(hparams=Config, build=job.build, loss=loss_fn, data=job.data, name=NAME,
                    evaluate=job.evaluate if job.valid is not None else None)
    trainer = Trainer(recipe, hp, group, NAME)
    job.say_resumed_batch(trainer)
    trainer.fit()
    job.save(trainer)


if __name__ == "__main__":
    main()
