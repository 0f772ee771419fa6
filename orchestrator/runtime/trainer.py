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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from orchestrator import protocol
from orchestrator.runtime import checkpoint as ckpt
from orchestrator.runtime import memfit
from orchestrator.runtime.balance import BalancedSampler, Balancer, Decision
from orchestrator.runtime.config import Hparams, parse_hparams, to_dict
from orchestrator.runtime.data import DataPosition, ShardedSampler, as_dataset
from orchestrator.runtime.events import emit
from orchestrator.runtime.gradcomm import GradientAverager, inverse_permutation, memory_order  # noqa: F401 (re-exported)
from orchestrator.runtime.telemetry import MemorySampler, Throughput, format_bytes
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


def broadcast_from_rank0(arrays: list[mx.array], group: mx.distributed.Group) -> list[mx.array]:
    """Every rank gets rank 0's values: an ``all_sum`` where the other ranks contribute zeros.

    ``x + 0 + ... + 0 == x`` exactly, so this is bit-exact (up to the sign of zero).
    """
    if group.size() == 1:
        return arrays
    if group.rank() != 0:
        arrays = [mx.zeros_like(a) for a in arrays]
    out = [mx.distributed.all_sum(a, group=group) for a in arrays]
    mx.eval(out)
    return out


# ----------------------------------------------------------------------------- helpers


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit seed for MLX's generator at ``step`` on ``rank`` (stable across runs and resumes)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


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


class Trainer:
    """One rank's training state and loop. ``run()`` is the usual entry point."""

    def __init__(self, recipe: Recipe, hp: Hparams, group: mx.distributed.Group, name: str) -> None:
        self.recipe, self.hp, self.group = recipe, hp, group
        self.rank, self.world = group.rank(), group.size()
        self.say = _Say(self.rank, name)
        self.ckpt_root = ckpt.checkpoints_dir()

        mx.random.seed(hp.seed)
        np.random.seed(hp.seed % 2**32)
        self.model, self.optimizer = recipe.build(hp)
        self.dataset = as_dataset(recipe.data(hp))
        self.loss_and_grad = nn.value_and_grad(self.model, recipe.loss)
        self.averager = GradientAverager(group, hp.grad_dtype)
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
        self._stop_together(resume_problem)
        if hp.shard_optimizer:
            self._sync_from_rank0(with_optimizer=False)
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
        self.last_memory_step = -1
        self.metrics: dict = {}
        if self.rank == 0:
            ckpt.clean_stale(self.ckpt_root)

    # -- resume -------------------------------------------------------------

    def _load_resume_checkpoint(self) -> None:
        candidates = ckpt.resolve_resume(self.hp.resume)
        if not candidates:
            self.say(f"--resume: no checkpoint in {self.ckpt_root}; starting from scratch")
            return
        errors = []
        for cand in candidates:
            try:
                model_arrays, opt_arrays = ckpt.load(cand)
                self.model.load_weights(list(model_arrays.items()), strict=True)
                if self.hp.shard_optimizer:  # sliced once the layout exists (_load_sharded_state)
                    self._resume_optimizer = opt_arrays
                else:
                    self.optimizer.state = tree_unflatten(list(opt_arrays.items()))
            except (ckpt.CheckpointError, ValueError) as e:
                errors.append(str(e))
                continue
            state = cand.state
            self._resume_shares = state.get("balance_shares")
            self.step = int(state["step"])
            self.position = DataPosition(epoch=int(state["epoch"]), offset=int(state["offset"]))
            self.resumed_from = cand.path
            self.say(f"resumed from {cand.path} (step {self.step})" + (f"; skipped: {errors}" if errors else ""))
            return
        raise ckpt.CheckpointError("no loadable checkpoint: " + "; ".join(errors))

    def _sync_from_rank0(self, with_optimizer: bool = True) -> None:
        """Make every rank start from rank 0's weights, optimizer state and data position.

        Only rank 0 reads checkpoints (it is the only one guaranteed to have them
        when ranks live on different hosts), and this also guards against ranks
        whose initial weights differ (e.g. different MLX versions). Arrays are
        paired by sorted name: a restored optimizer state need not iterate in
        the same order as a freshly initialised one. A sharded optimizer's state
        differs per rank by design: it is set up by :meth:`_load_sharded_state`.
        """
        if self.world == 1:
            return
        params = sorted(tree_flatten(self.model.parameters()), key=lambda kv: kv[0])
        opt_state = sorted(tree_flatten(self.optimizer.state), key=lambda kv: kv[0]) if with_optimizer else []
        self._check_same_structure(params + [("optimizer." + k, v) for k, v in opt_state])
        counters = mx.array([self.step, self.position.epoch, self.position.offset], dtype=mx.int64)
        synced = broadcast_from_rank0([a for _, a in params] + [a for _, a in opt_state] + [counters], self.group)
        n_params = len(params)
        synced_params, synced_state = synced[:n_params], synced[n_params:-1]
        self.model.update(tree_unflatten([(k, a) for (k, _), a in zip(params, synced_params, strict=True)]))
        if with_optimizer:
            self.optimizer.state = tree_unflatten([(k, a) for (k, _), a in zip(opt_state, synced_state, strict=True)])
        step, epoch, offset = (int(v) for v in synced[-1].tolist())
        self.step, self.position = step, DataPosition(epoch=epoch, offset=offset)

    def _load_sharded_state(self) -> None:
        """Each rank takes its slices of the per-parameter optimizer state rank 0 resumed from, if any.

        Checkpoints hold the ordinary per-parameter state whatever the world
        size or sharding that wrote them, so this re-slices for this run.
        """
        assert self.sharded is not None
        loaded = self._resume_optimizer is not None
        if self.world > 1:
            (flag,) = broadcast_from_rank0([mx.array(int(loaded))], self.group)
            loaded = bool(flag.item())
        if not loaded:
            return
        problem = None
        if self.rank == 0:
            missing = self.sharded.missing(self._resume_optimizer)
            if missing:
                problem = (f"--resume {self.resumed_from}: optimizer state does not fit this model/optimizer "
                           f"(missing or misshapen: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
        self._stop_together(problem)
        self.sharded.load_state(self._resume_optimizer)
        self._resume_optimizer = None

    def _check_same_structure(self, named: list[tuple[str, mx.array]]) -> None:
        """Fail clearly, instead of hanging in a mismatched all_sum, if ranks built different models."""
        signature = ";".join(f"{k}:{a.shape}:{a.dtype}" for k, a in named)
        digest = hashlib.blake2b(signature.encode(), digest_size=4).digest()
        mine = mx.array(int.from_bytes(digest, "little"), dtype=mx.int64)
        (rank0,) = broadcast_from_rank0([mine], self.group)
        differs = rank0.item() != mine.item()
        self._stop_together(
            f"rank {self.rank} built a model/optimizer that differs from rank 0's "
            "(a different recipe version or hyper-parameters on this host?)" if differs else None
        )

    def _stop_together(self, problem: Optional[str]) -> None:
        """Raise on *every* rank if any rank has a problem, so none is left waiting in a collective."""
        if self.world == 1:
            if problem:
                raise RuntimeError(problem)
            return
        failed = mx.distributed.all_sum(mx.array(int(problem is not None)), group=self.group).item()
        if problem:
            raise RuntimeError(problem)
        if failed:
            raise RuntimeError(f"stopping: {failed} other rank(s) failed to start (see their output)")

    # -- balance (--balance speed) -------------------------------------------

    def _gather(self, value: float) -> list[float]:
        """Every rank's ``value``, in rank order: an all_sum where each rank fills its own slot (exact)."""
        mine = np.zeros(self.world, dtype=np.float32)
        mine[self.rank] = value
        out = mx.distributed.all_sum(mx.array(mine), group=self.group)
        return [float(v) for v in np.array(out)]

    def _initial_shares(self) -> Optional[list[int]]:
        """Rank 0's shares from the checkpoint it resumed (same world and batch), else equal: the same on every rank."""
        hp, shares = self.hp, self._resume_shares
        ok = (self.rank == 0 and isinstance(shares, list) and len(shares) == self.world
              and all(isinstance(b, int) and b >= 1 for b in shares) and sum(shares) == self.world * hp.batch_size)
        mine = np.array(shares if ok else [0] * self.world, dtype=np.float32)
        (synced,) = broadcast_from_rank0([mx.array(mine)], self.group)
        got = [int(v) for v in np.array(synced)]
        return got if min(got) >= 1 else None

    def _rebalanced(self, decision: Decision) -> None:
        """Apply a check's outcome at this step boundary; report it if the shares changed."""
        if not decision.changed:
            return
        assert isinstance(self.sampler, BalancedSampler)
        self.sampler.set_shares(decision.shares)
        if self.memory_line is not None and self.hp.fit_memory:  # a bigger share may need more pieces
            self._apply_memory_plan(decision.shares[self.rank])
        emit("rebalance", **decision.event_fields())
        speeds = ", ".join(f"{s:,.0f}" for s in decision.speeds)
        self.say(f"rebalance at step {decision.step} ({decision.reason}): per-rank batch "
                 f"{decision.previous} -> {decision.shares} (measured samples/s {speeds}; predicted step "
                 f"{1000 * decision.previous_step_s:.1f} -> {1000 * decision.predicted_step_s:.1f} ms of compute)")

    # -- memory plan (memfit) -------------------------------------------------

    @staticmethod
    def _mlx_memory_fn(name: str) -> Optional[Callable]:
        """``mx.<name>``, or ``mx.metal.<name>`` on MLX < 0.24; None where this MLX has neither."""
        return getattr(mx, name, None) or getattr(getattr(mx, "metal", None), name, None)

    def _probe_peak(self, batch: int) -> int:
        """MLX's peak over forward + backward at ``batch`` samples (no update: nothing changes)."""
        idx = np.arange(batch) % len(self.dataset)
        self._mlx_memory_fn("reset_peak_memory")()
        loss, grads = self.loss_and_grad(self.model, *self._batch(idx))
        mx.eval(loss, grads)
        peak = int(self._mlx_memory_fn("get_peak_memory")())
        del loss, grads
        return peak

    def _plan_memory(self) -> None:
        """Predict this rank's peak at its planned micro-batch; refuse together, or (--fit-memory) split it.

        Every rank reaches the collective at the end, also one whose MLX cannot
        measure a peak (it makes no plan): hosts of a mixed cluster may run
        different MLX versions, and a rank that skipped it would leave the
        others waiting in a mismatched all_sum.
        """
        problem = None
        if all(self._mlx_memory_fn(f) for f in ("reset_peak_memory", "get_peak_memory", "clear_cache")):
            plan = self._make_memory_plan()
            problem = None if plan.fits else plan.refusal()
        try:
            self._stop_together(problem)
        except RuntimeError as e:  # one line, no traceback: the controller shows it as this rank's last line
            raise SystemExit(f"orch: {e}") from None

    def _make_memory_plan(self) -> memfit.Plan:
        share = self.balancer.share if self.balancer is not None else self.hp.batch_size
        mx.eval(self.model.parameters(), self.optimizer.state)
        points = [(b, self._probe_peak(b)) for b in sorted(set(memfit.probe_sizes(share)))]
        self._mlx_memory_fn("clear_cache")()
        self._mlx_memory_fn("reset_peak_memory")()  # the peaks reported from here on are training's own
        param_bytes = sum(a.nbytes for _, a in tree_flatten(self.model.trainable_parameters()))
        # The update allocates new parameters and optimizer state while the old are alive; the gradient sum
        # (accumulation) or the all-reduce's flat copy is one more parameter-sized set.
        extra = 2 * param_bytes + self.optimizer_state_bytes()
        sample = self.memory.sample(self.step)
        metal = self.memory.metal_max_working_set
        other = 0 if metal else max(0, sample["rss_bytes"] - sample["mlx_active_bytes"] - sample["mlx_cache_bytes"])
        self.memory_line = memfit.fit(points, extra, other)
        self.memory_budget = memfit.budget(sample["rss_bytes"], metal, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        plan = self._apply_memory_plan(share)
        emit("memory_plan", step=self.step, probes=[list(p) for p in points], **plan.event_fields())
        return plan

    def _apply_memory_plan(self, share: int) -> memfit.Plan:
        assert self.memory_line is not None
        plan = memfit.decide(self.memory_line, share, self.memory_budget, platform.node(), self.hp.fit_memory)
        if plan.fits and plan.pieces != self.pieces:
            print(f"[{self.say.name}] --fit-memory: rank {self.rank} ({plan.host}) runs its {share} samples per "
                  f"micro-batch as {plan.pieces} pieces of <= {plan.micro_batch} (predicted peak "
                  f"{format_bytes(plan.planned_peak_bytes)} -> {format_bytes(plan.predicted_peak_bytes)}, budget "
                  f"{format_bytes(plan.budget_bytes)} from the {plan.budget_source})", flush=True)
        self.pieces = plan.pieces if plan.fits else 1
        return plan

    def _loss_and_grad(self, indices: np.ndarray) -> tuple[mx.array, Any]:
        """Mean loss and gradient over ``indices``; in ``self.pieces`` parts when memory asks for it.

        The parts' means are combined weighted by their sizes, which is the mean
        over all of ``indices``: the same gradient, less memory at once.
        """
        if self.pieces == 1:
            return self.loss_and_grad(self.model, *self._batch(indices))
        n = len(indices)
        loss_sum, grad_sum = None, None
        for start, end in memfit.split_pieces(n, self.pieces):
            loss, grads = self.loss_and_grad(self.model, *self._batch(indices[start:end]))
            w = (end - start) / n
            loss, grads = loss * w, tree_map(lambda g: g * w, grads)
            if grad_sum is None:
                loss_sum, grad_sum = loss, grads
            else:
                loss_sum, grad_sum = loss_sum + loss, tree_map(mx.add, grad_sum, grads)
            mx.eval(loss_sum, grad_sum)  # one piece's graph at a time: the point of splitting
        return loss_sum, grad_sum

    # -- one step -----------------------------------------------------------

    def _batch(self, indices: np.ndarray) -> list[mx.array]:
        return [mx.array(a) for a in self.dataset[indices]]

    def train_step(self) -> tuple[mx.array, int]:
        """One optimizer step; returns (loss averaged over ranks and micro-batches, epoch)."""
        started = time.perf_counter()
        epoch, micro_batches = self.sampler.next_step()
        mx.random.seed(step_seed(self.hp.seed, self.step, self.rank))

        k = len(micro_batches)
        loss_sum, grad_sum = None, None
        for j, indices in enumerate(micro_batches):
            loss, grads = self._loss_and_grad(indices)
            if grad_sum is None:
                loss_sum, grad_sum = loss, grads
            else:
                loss_sum = loss_sum + loss
                grad_sum = tree_map(mx.add, grad_sum, grads)
            if j < k - 1:
                # Bound memory to one micro-batch's graph: the point of accumulating.
                mx.eval(loss_sum, grad_sum)
        if k > 1:
            grad_sum = tree_map(lambda g: g / k, grad_sum)
            loss_sum = loss_sum / k
        if self.balancer is not None:
            # This rank's own compute, without the wait for the others in the all-reduce: its speed.
            mx.eval(loss_sum, grad_sum)
            self.balancer.record(time.perf_counter() - started, samples=k * len(micro_batches[0]))
            w = self.balancer.weight
            if w != 1.0:  # sample-count weighting: the all-reduce's mean is then the global-batch mean
                grad_sum = tree_map(lambda g: g * w, grad_sum)
                loss_sum = loss_sum * w
        grads, loss = self._average(grad_sum, loss_sum)
        if self.sharded is not None:
            self.sharded.update(self.model, grads)
        else:
            self.optimizer.update(self.model, grads)
        mx.eval(loss, self.model.parameters(), self.optimizer.state)
        self.step += 1
        return loss, epoch

    def _average(self, grads: Any, loss: mx.array) -> tuple[Any, mx.array]:
        """Average gradients and loss over ranks (``gradcomm.GradientAverager``: one all-reduce,
        in ``--grad-dtype`` on the wire, results back in the gradients' own dtype)."""
        return self.averager(grads, loss)

    # -- side work ----------------------------------------------------------

    def save_checkpoint(self) -> None:
        if self.step == self.last_checkpoint_step:
            return
        self.last_checkpoint_step = self.step
        started = time.perf_counter()
        # Sharded: every rank hands in its slices (a collective); the file format stays per-parameter.
        opt_arrays = self.sharded.gather_state() if self.sharded is not None else None
        if self.rank != 0:
            return
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
            dict(tree_flatten(self.model.parameters())), opt_arrays,
            meta, keep=self.hp.keep_checkpoints,
        )
        self.last_checkpoint = path
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

    def evaluate(self, final: bool = False) -> None:
        """The recipe's evaluation (rank 0); the final one also reports every rank's optimizer state bytes.

        Those bytes ride in the end-of-run ``metric`` event (one per rank, the
        evaluation's values added on rank 0) rather than a new event kind.
        """
        values: dict = {}
        if self.recipe.evaluate is not None and self.rank == 0:
            values = {k: float(v) for k, v in self.recipe.evaluate(self.model, self.hp).items()}
            self.say(f"eval step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if final:
            values["optimizer_state_bytes"] = self.optimizer_state_bytes()
        if not values:
            return
        self.metrics = values
        emit("metric", step=self.step, values=values)

    # -- the loop -----------------------------------------------------------

    def fit(self) -> RunResult:
        hp = self.hp
        log_every = hp.log_every or _default_log_every(hp.steps)
        self.say(
            f"{self.world} rank(s), batch {hp.batch_size}/rank x {hp.grad_accum} accum = "
            f"{self.sampler.samples_per_step} samples/step, {len(self.dataset)} samples, "
            f"steps {self.step}->{hp.steps}"
        )
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
        while self.step < hp.steps:
            started = time.perf_counter()
            loss, epoch = self.train_step()
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

        self.save_checkpoint()
        self.evaluate(final=True)
        mem = self.sample_memory()
        sharded = f" (1/{self.world} shard)" if self.sharded is not None else ""
        self.say(f"done at step {self.step}; peak MLX memory {format_bytes(mem['mlx_peak_bytes'])}, "
                 f"RSS {format_bytes(mem['rss_bytes'])}, "
                 f"optimizer state {format_bytes(self.optimizer_state_bytes())}{sharded}")
        emit("finished", step=self.step)
        return RunResult(step=self.step, loss=last_loss, metrics=self.metrics, checkpoint=self.last_checkpoint)


def run(recipe: Recipe, argv: Optional[list[str]] = None) -> RunResult:
    """Parse hyper-parameters from ``argv`` (default ``sys.argv``), join the group, train."""
    name = recipe.name or Path(sys.argv[0]).stem or "recipe"
    hp = parse_hparams(recipe.hparams, argv, prog=name)
    group = init_group()
    return Trainer(recipe, hp, group, name).fit()
