"""The training loop every rank runs: ``run(Recipe(...))``.

A recipe says *what* to train (model, optimizer, loss, data, hyper-parameters);
this module does the rest the same way for every recipe:

* joins the distributed group (``mx.distributed.init``) and checks it has the
  size the launcher planned, so a misconfigured ring fails loudly instead of
  training N independent copies;
* seeds everything from ``--seed`` so all ranks build identical models, and
  reseeds MLX's generator from ``(seed, step, rank)`` before every step: MLX
  cannot save/restore its random state, so this is what makes a resumed run
  bit-identical to an uninterrupted one;
* shards data by rank (``data.ShardedSampler``), so N ranks x batch b == 1
  rank x batch N*b; with ``--balance speed`` each rank's share of the same
  global batch follows its measured speed and gradients are weighted by
  sample count (``balance``), so the update is still the global-batch mean;
* per step: ``nn.value_and_grad`` (over ``--grad-accum`` micro-batches),
  the gradient all-reduce (``gradcomm``: ``nn.average_gradients``, in
  ``--grad-dtype`` on the wire), optimizer update (with ``--shard-optimizer``
  on this rank's slice only, then an all_gather: ``zero``), then exactly one
  ``mx.eval`` for parameters, optimizer state and the loss averaged over ranks;
* writes atomic checkpoints (rank 0), samples memory, emits protocol events
  and prints a short progress line (rank 0).

Where each part lives: this module has the recipe, the group, the trainer's
state and its loop (checkpoints, evaluation, events, progress lines);
``runtime/train_step.py`` one optimizer step (accumulation, memory pieces,
balance weighting, all-reduce, update); ``runtime/rank_sync.py`` what ranks
agree on (resume from rank 0, identical models, stopping together).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from orchestrator import protocol
from orchestrator.runtime import checkpoint as ckpt
from orchestrator.runtime import memfit, quiet_wait, shard
from orchestrator.runtime.allocator import KEPT_FREED_BYTES, keep_freed_memory, stop_keeping_freed_memory
from orchestrator.runtime.balance import BalancedSampler, Balancer
from orchestrator.runtime.config import Hparams, parse_hparams, to_dict
from orchestrator.runtime.data import DataPosition, ShardedSampler, as_dataset
from orchestrator.runtime.events import emit
from orchestrator.runtime.gradcomm import GradientAverager
from orchestrator.runtime.rank_sync import RankSync
from orchestrator.runtime.stop_request import StopRequest
from orchestrator.runtime.telemetry import MemorySampler, Throughput, format_bytes
from orchestrator.runtime.train_step import TrainStep
from orchestrator.runtime.zero import ShardedOptimizer, state_bytes

BACKEND_ENV = protocol.ENV_BACKEND


@dataclass
class Recipe:
    """What to train. Only ``build``, ``loss`` and ``data`` are required.

    * ``build(hp) -> (model, optimizer)``; use :func:`optimizer_from` to honour ``--optimizer``/``--lr``.
    * ``loss(model, *batch) -> scalar``: the *mean* loss over the batch (``batch`` is what ``data`` yields per sample).
    * ``data(hp) -> (X, Y, ...)`` arrays sharing their first dimension, or any object with
      ``__len__`` and ``__getitem__(index_array) -> tuple of arrays`` (see ``data.Dataset``).
    * ``hparams``: a :class:`Hparams` subclass; its fields are the command-line flags.
    * ``evaluate(model, hp) -> {name: float}``: optional, run on rank 0 at the end (and every ``--eval-every``).
    * ``tokens_per_sample``: an int or ``hp -> int`` if samples are token sequences (enables tokens/s).
    """

    build: Callable[[Any], tuple[nn.Module, optim.Optimizer]]
    loss: Callable[..., mx.array]
    data: Callable[[Any], Any]
    hparams: type[Hparams] = Hparams
    evaluate: Optional[Callable[[nn.Module, Any], dict]] = None
    tokens_per_sample: Union[int, Callable[[Any], int], None] = None
    name: Optional[str] = None


@dataclass
class RunResult:
    step: int
    loss: Optional[float]
    metrics: dict = field(default_factory=dict)
    checkpoint: Optional[Path] = None


def optimizer_from(hp: Hparams) -> optim.Optimizer:
    """The optimizer named by ``--optimizer`` with learning rate ``--lr``."""
    name = hp.optimizer.lower()
    if name == "sgd":
        return optim.SGD(learning_rate=hp.lr)
    if name == "adam":
        return optim.Adam(learning_rate=hp.lr)
    if name == "adamw":
        return optim.AdamW(learning_rate=hp.lr)
    raise SystemExit(f"unknown --optimizer {hp.optimizer!r} (sgd, adam, adamw)")


# ----------------------------------------------------------------------------- distributed group


def _expected_world_size() -> Optional[int]:
    """The size the launcher planned: MPI's environment, NCCL's ``MLX_WORLD_SIZE``, or the ring / JACCL file.

    Without it ``init`` is not strict, and a backend that fails to initialise
    (NCCL on a machine without CUDA, say) silently gives every rank a singleton
    group: N independent trainings that all "succeed".
    """
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    for var in ("MLX_HOSTFILE", "MLX_IBV_DEVICES"):  # ring: one entry per rank; jaccl: the N x N rdma matrix
        path = os.environ.get(var)
        if path:
            try:
                with open(path) as fh:
                    return len(json.load(fh))
            except (OSError, ValueError, TypeError):
                return None
    return None


def init_group() -> mx.distributed.Group:
    """``mx.distributed.init`` with the backend the launcher chose (``$ORCH_BACKEND``, default any).

    Without any launcher environment this is a group of size 1. The
    ``init_start``/``ready`` events are not sent here: under ``orch`` the rank
    bootstrap (``runtime/bootstrap.py``) wraps ``mx.distributed.init`` and
    sends them for every script, recipe or not.
    """
    backend = os.environ.get(BACKEND_ENV) or "any"
    expected = _expected_world_size()
    group = mx.distributed.init(strict=backend != "any" and (expected or 1) > 1, backend=backend)
    if expected is not None and group.size() != expected:
        raise RuntimeError(
            f"distributed group has {group.size()} rank(s) but the launcher planned {expected} "
            f"(backend {backend!r}); MLX fell back to a singleton group: check MLX_HOSTFILE / the MPI setup"
        )
    return group




# ----------------------------------------------------------------------------- helpers




def _tokens_per_sample(recipe: Recipe, hp: Hparams) -> Optional[int]:
    tps = recipe.tokens_per_sample
    return tps(hp) if callable(tps) else tps


def _default_log_every(steps: int) -> int:
    return max(1, steps // 10)


class _Say:
    """Human progress lines, printed by rank 0 only."""

    def __init__(self, rank: int, name: str) -> None:
        self.enabled = rank == 0
        self.name = name

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[{self.name}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the trainer


class Trainer(RankSync, TrainStep):
    """One rank's training state and loop. ``run()`` is the usual entry point.

    The state is made here, and the loop, checkpoints, evaluation and reports
    live here; the agreement across ranks (resume, rank 0's state, stopping
    together) is ``RankSync`` and one optimizer step is ``TrainStep``.
    """

    def __init__(self, recipe: Recipe, hp: Hparams, group: mx.distributed.Group, name: str) -> None:
        self.recipe, self.hp, self.group = recipe, hp, group
        self.rank, self.world = group.rank(), group.size()
        self.say = _Say(self.rank, name)
        self.ckpt_root = ckpt.checkpoints_dir()
        # Before the model's first buffers are allocated (runtime/allocator.py).
        if hp.keep_freed_memory:
            keep_freed_memory()

        mx.random.seed(hp.seed)
        np.random.seed(hp.seed % 2**32)
        self.model, self.optimizer = recipe.build(hp)
        self.dataset = as_dataset(recipe.data(hp))
        self.loss_and_grad = nn.value_and_grad(self.model, recipe.loss)
        self.averager = GradientAverager(group, hp.grad_dtype)
        # --quiet-wait: building it is collective, so every rank builds it here, at the same point
        self.quiet = quiet_wait.QuietBarrier(group) if quiet_wait.wanted(hp.quiet_wait, self.world) else None
        self.sharded: Optional[ShardedOptimizer] = None  # --shard-optimizer
        self._resume_optimizer: Optional[dict] = None  # rank 0's per-parameter state, for the sharded optimizer
        self._resume_shares: Optional[list] = None  # --balance speed: the shares the checkpoint was written with

        self.step = 0
        self.position = DataPosition()  # handed to the sampler, which advances it
        self.resumed_from: Optional[Path] = None
        resume_problem = None
        if hp.resume is not None and self.rank == 0:
            try:
                self._load_resume_checkpoint()
            except ckpt.CheckpointError as e:
                resume_problem = str(e)
        self._stop_together(resume_problem, bad_input=True)
        if hp.shard == "auto":  # runtime/shard.py: the least sharding whose predicted peak fits every rank
            budget = memfit.budget(MemorySampler().sample(0)["rss_bytes"], MemorySampler().metal_max_working_set,
                                   int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
            hp.shard, keep = shard.choose_stage(self.model, self.optimizer, self.world, self._gather, self.say,
                                                MemorySampler().sample(0), budget,
                                                kept_freed=KEPT_FREED_BYTES if hp.keep_freed_memory else 0)
            if not keep:
                stop_keeping_freed_memory()
            hp.shard_optimizer = hp.shard == "optimizer"
            if hp.shard == "none" and self._resume_optimizer is not None:  # kept for slicing: not needed
                self.optimizer.state = tree_unflatten(list(self._resume_optimizer.items()))
                self._resume_optimizer = None
        if hp.shard_optimizer or hp.shard == "full":
            self._sync_from_rank0(with_optimizer=False)
            if hp.shard == "full":  # runtime/shard.py: the model's leaves sharded in place
                self.sharded = shard.FullShard(self.model, self.optimizer, group, say=self.say)
                self.averager = self.sharded.averager
            else:
                self.sharded = ShardedOptimizer(self.optimizer, self.model, group)
            self._load_sharded_state()
        else:
            # Adam & co. create their state lazily; make it exist now so it can be broadcast.
            self.optimizer.init(self.model.trainable_parameters())
            self._sync_from_rank0()

        self.balancer: Optional[Balancer] = None  # --balance speed
        if hp.balance == "speed" and self.world > 1:
            self.balancer = Balancer(
                world=self.world, rank=self.rank, global_micro=self.world * hp.batch_size, gather=self._gather,
                every=hp.balance_every, warmup=hp.balance_warmup, threshold=hp.balance_threshold,
                shares=self._initial_shares(),
            )
            self.sampler: ShardedSampler = BalancedSampler(
                len(self.dataset), rank=self.rank, world=self.world, batch_size=hp.batch_size,
                grad_accum=hp.grad_accum, seed=hp.seed, position=self.position, shares=self.balancer.shares,
            )
        else:
            self.sampler = ShardedSampler(
                len(self.dataset), rank=self.rank, world=self.world, batch_size=hp.batch_size,
                grad_accum=hp.grad_accum, seed=hp.seed, position=self.position,
            )
        self.throughput = Throughput(self.sampler.samples_per_step, _tokens_per_sample(recipe, hp))
        self.memory = MemorySampler()
        self.pieces = 1  # --fit-memory: this rank's share of each micro-batch is run in this many parts
        self.memory_line: Optional[memfit.Line] = None
        self.memory_budget: Optional[memfit.Budget] = None
        if hp.memory_check:
            self._plan_memory()
        self.last_checkpoint: Optional[Path] = None
        # A resumed run must not rewrite the checkpoint it started from.
        self.last_checkpoint_step = self.step if self.step > 0 else -1
        self.last_checkpoint_s: Optional[float] = None  # how long the last save took (the final save's estimate)
        self.stop = StopRequest()  # SIGTERM from orch: stop at the next step boundary (runtime/stop_request.py)
        self.stopping = False  # every rank's stop flag, as the last step's all-reduce summed them
        self.last_memory_step = -1
        self.metrics: dict = {}
        if self.rank == 0:
            ckpt.clean_stale(self.ckpt_root)

    # -- side work ----------------------------------------------------------

    def save_checkpoint(self) -> None:
        if self.step == self.last_checkpoint_step:
            return
        self.last_checkpoint_step = self.step
        started = time.perf_counter()
        # Sharded: every rank hands in its slices (a collective); the file format stays per-parameter.
        opt_arrays = self.sharded.gather_state() if self.sharded is not None else None
        full_params = self.sharded.gather_params() if isinstance(self.sharded, shard.FullShard) else None
        if self.rank != 0:
            return
        emit("phase_start", name="checkpoint")  # ends with the "checkpoint" event: the cadence watchdog waits
        if opt_arrays is None:
            opt_arrays = dict(tree_flatten(self.optimizer.state))
        meta = {
            "epoch": self.position.epoch,
            "offset": self.position.offset,
            "seed": self.hp.seed,
            "world_size": self.world,
            "balance_shares": list(self.balancer.shares) if self.balancer is not None else None,
            "recipe": self.say.name,
            "hparams": to_dict(self.hp),
        }
        path = ckpt.save(
            self.ckpt_root, self.step,
            full_params or dict(tree_flatten(self.model.parameters())), opt_arrays,
            meta, keep=self.hp.keep_checkpoints,
        )
        self.last_checkpoint = path
        self.last_checkpoint_s = time.perf_counter() - started
        emit("checkpoint", step=self.step, path=str(path))
        self.say(f"checkpoint step {self.step} -> {path} ({time.perf_counter() - started:.2f} s)")

    def sample_memory(self) -> dict:
        sample = self.memory.sample(self.step)
        if sample["step"] != self.last_memory_step:
            emit("memory", **sample)
            self.last_memory_step = sample["step"]
        return sample

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (about 1/N of the full state with --shard-optimizer)."""
        return state_bytes(self.optimizer.state)

    def wire_metrics(self) -> dict:
        """What a step puts on the wire, per rank: the all-reduce's payload (in the ``--grad-dtype`` it
        travels in) and the bytes a ring all-reduce of it sends, 2(N-1)/N of it (ring and JACCL-ring
        exactly; MPI and NCCL pick their own algorithms, of the same order); ``--shard-optimizer``
        adds the all_gather of the updated parameters, (N-1)/N of them."""
        if isinstance(self.sharded, shard.FullShard):
            return self.sharded.wire_metrics()
        if self.world == 1:
            return {"allreduce_payload_bytes_per_step": 0, "bytes_sent_per_step": 0}
        params = self.model.trainable_parameters()
        payload = self.averager.payload_bytes(params)
        sent = 2 * (self.world - 1) * payload // self.world
        if self.sharded is not None:
            sent += (self.world - 1) * sum(p.nbytes for _, p in tree_flatten(params)) // self.world
        return {"allreduce_payload_bytes_per_step": payload, "bytes_sent_per_step": sent}

    def evaluate(self, final: bool = False) -> None:
        """The recipe's evaluation (rank 0); the final one also reports every rank's optimizer state
        bytes and what a step put on the wire (``wire_metrics``).

        Those numbers ride in the end-of-run ``metric`` event (one per rank, the
        evaluation's values added on rank 0) rather than a new event kind.
        """
        values: dict = {}
        whole = self.sharded.unsharded(self.recipe.evaluate is not None) \
            if isinstance(self.sharded, shard.FullShard) else contextlib.nullcontext()
        with whole:  # --shard full: rank 0 evaluates the whole model (gathered by every rank)
            if self.recipe.evaluate is not None and self.rank == 0:
                emit("phase_start", name="eval")  # ends with the "metric" event (or the next step)
                values = {k: float(v) for k, v in self.recipe.evaluate(self.model, self.hp).items()}
                self.say(f"eval step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if final:
            values["optimizer_state_bytes"] = self.optimizer_state_bytes()
            values.update(self.wire_metrics())
            if self.quiet is not None:
                values.update(self.quiet.metrics())
        if not values:
            return
        self.metrics = values
        emit("metric", step=self.step, values=values)

    def _stop_at_boundary(self) -> None:
        """orch is stopping the run (SIGTERM): a final checkpoint if it ends before the SIGKILL, then end.

        Every rank is here at the same boundary: the step's all-reduce carried each rank's stop flag
        (``TrainStep.train_step``), so no rank leaves another inside a collective, however far apart
        their guards' signals came. Only unsharded: rank 0 then saves alone, from parameters every
        rank agrees on after this step, while the others end. With ``--shard`` the save is a
        collective and the last periodic checkpoint stays the latest.
        """
        self.stop.by_peer()
        if self.rank == 0 and self.ckpt_root is not None and self.step != self.last_checkpoint_step:
            nbytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
            nbytes += state_bytes(self.optimizer.state)
            if self.sharded is not None:
                self.say(f"stopping at step {self.step}: no final checkpoint when sharded (--shard) "
                         f"(the last is step {max(self.last_checkpoint_step, 0)})")
            elif self.stop.final_checkpoint_fits(nbytes, self.last_checkpoint_s):
                self.save_checkpoint()
                self.say(f"stopping at step {self.step}: final checkpoint written "
                         f"({self.stop.time_left():.2f} s of --grace left)")
            else:
                self.say(f"stopping at step {self.step}: no time for a final checkpoint within --grace "
                         f"({self.stop.time_left():.2f} s left); the last is step {max(self.last_checkpoint_step, 0)}")
        self.stop.end()

    # -- the loop -----------------------------------------------------------

    def fit(self) -> RunResult:
        hp = self.hp
        log_every = hp.log_every or _default_log_every(hp.steps)
        self.say(
            f"{self.world} rank(s), batch {hp.batch_size}/rank x {hp.grad_accum} accum = "
            f"{self.sampler.samples_per_step} samples/step, {len(self.dataset)} samples, "
            f"steps {self.step}->{hp.steps}"
        )
        if self.world > 1 and hp.grad_dtype != "float32":
            params = [p for _, p in tree_flatten(self.model.trainable_parameters())]
            payload = self.averager.payload_bytes(self.model.trainable_parameters())
            self.say(f"--grad-dtype {hp.grad_dtype}: " + (
                f"gradients travel in {hp.grad_dtype}, {payload / 2**20:.1f} MiB a step" if self.averager.narrows(params)
                else f"only {payload / 2**20:.2f} MiB of gradients, latency-bound: they travel in float32 "
                     "(exact, and faster than two collectives and a cast)"))
        emit("train_start", step=self.step, total_steps=hp.steps)
        if self.balancer is not None:
            self.balancer.start(self.step)
            shares = self.balancer.shares
            emit("rebalance", step=self.step, shares=list(shares), previous=list(shares), speeds=[],
                 reason="start", predicted_step_s=None, previous_step_s=None)
            self.say(f"--balance speed: per-rank batch {shares} of {sum(shares)}; speeds measured after "
                     f"{hp.balance_warmup} step(s), then every {hp.balance_every}")
        last_loss: Optional[float] = None
        first_step = self.step + 1
        window_start, window_steps = time.perf_counter(), 0
        self.stop.arm()
        while self.step < hp.steps:
            started = time.perf_counter()
            try:
                loss, epoch = self.train_step()
            except Exception:
                if self.stop.pending:  # a peer ended at its stop boundary while this rank was in a collective
                    self.stop.end()
                raise
            step_time = time.perf_counter() - started
            if self.balancer is not None and self.step < hp.steps:
                decision = self.balancer.check(self.step)
                if decision is not None:
                    self._rebalanced(decision)
            last_loss = loss.item()
            samples_per_s, tokens_per_s = self.throughput.rates(step_time)
            emit("step", step=self.step, epoch=epoch, loss=last_loss, samples_per_s=samples_per_s,
                 tokens_per_s=tokens_per_s, step_time_s=step_time, total_steps=hp.steps)
            window_steps += 1
            if self.step % log_every == 0 or self.step in (first_step, hp.steps):
                elapsed = time.perf_counter() - window_start
                rate, tok_rate = self.throughput.rates(elapsed / window_steps)
                tokens = f" | {tok_rate:,.0f} tok/s" if tok_rate else ""
                self.say(f"step {self.step}/{hp.steps} | epoch {epoch} | loss {last_loss:.4f} | "
                         f"{rate:,.0f} samples/s{tokens} | {1000 * elapsed / window_steps:.1f} ms/step")
                window_start, window_steps = time.perf_counter(), 0
            if hp.stats_every and self.step % hp.stats_every == 0:
                self.sample_memory()
            if hp.checkpoint_every and self.step % hp.checkpoint_every == 0:
                self.save_checkpoint()
            if hp.eval_every and self.step % hp.eval_every == 0 and self.step < hp.steps:
                self.evaluate()
            if self.stopping:  # some rank was asked to stop before this step's all-reduce: all end here
                self._stop_at_boundary()

        self.stop.release()
        self.save_checkpoint()
        self.evaluate(final=True)
        mem = self.sample_memory()
        sharded = ""
        if self.sharded is not None:
            whole = isinstance(self.sharded, shard.FullShard) and not self.sharded.shards_state()
            sharded = " (whole on every rank: no trainable parameter is sharded)" if whole else f" (1/{self.world} shard)"
        self.say(f"done at step {self.step}; peak MLX memory {format_bytes(mem['mlx_peak_bytes'])}, "
                 f"RSS {format_bytes(mem['rss_bytes'])}, "
                 f"optimizer state {format_bytes(self.optimizer_state_bytes())}{sharded}")
        emit("finished", step=self.step)
        if self.quiet is not None:
            self.quiet.close()
        return RunResult(step=self.step, loss=last_loss, metrics=self.metrics, checkpoint=self.last_checkpoint)


def run(recipe: Recipe, argv: Optional[list[str]] = None) -> RunResult:
    """Parse hyper-parameters from ``argv`` (default ``sys.argv``), join the group, train."""
    name = recipe.name or Path(sys.argv[0]).stem or "recipe"
    hp = parse_hparams(recipe.hparams, argv, prog=name)
    group = init_group()
    return Trainer(recipe, hp, group, name).fit()
