"""One optimizer step of the trainer: micro-batches, accumulation, memory pieces, weighting, all-reduce, update.

* MLX's generator is reseeded from ``(seed, step, rank)`` before every step
  (``step_seed``): MLX cannot save/restore its random state, so this is what
  makes a resumed run bit-identical to an uninterrupted one;
* ``nn.value_and_grad`` over ``--grad-accum`` micro-batches, evaluating the
  sum after each so memory holds one micro-batch's graph;
* with ``--memory-check``/``--fit-memory`` (``memfit``) the peak is measured at
  a few batch sizes before training; a micro-batch that would not fit is
  refused on every rank, or run in pieces whose size-weighted means are the
  same gradient;
* with ``--balance speed`` each rank's own compute time is recorded and its
  gradient weighted by its sample count (``balance``), so the all-reduce's
  mean is still the global-batch mean; a check's new shares are applied at
  the step boundary (``_rebalanced``);
* the gradient all-reduce (``gradcomm``, in ``--grad-dtype`` on the wire), the
  update (with ``--shard-optimizer`` on this rank's slice only: ``zero``), then
  exactly one ``mx.eval`` for parameters, optimizer state and the loss.

``TrainStep`` is one part of ``runtime/trainer.py``'s ``Trainer`` (with
``runtime/rank_sync.py``'s ``RankSync``); subclasses (the benchmarks) override
``train_step`` and ``_average`` on the ``Trainer``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from orchestrator.runtime import memfit
from orchestrator.runtime.allocator import return_freed_memory
from orchestrator.runtime.balance import BalancedSampler, Balancer, Decision
from orchestrator.runtime.events import emit
from orchestrator.runtime.telemetry import format_bytes


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit seed for MLX's generator at ``step`` on ``rank`` (stable across runs and resumes)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class TrainStep:
    """The gradient path of one step, and the plans that shape it (memory pieces, balance shares)."""

    # The trainer's state this part reads and sets (``Trainer.__init__`` makes it).
    hp: Any
    rank: int
    model: Any
    optimizer: Any
    dataset: Any
    loss_and_grad: Callable
    averager: Callable
    quiet: Any  # runtime/quiet_wait.QuietBarrier, or None
    sharded: Any
    balancer: Optional[Balancer]
    sampler: Any
    memory: Any
    step: int
    pieces: int
    memory_line: Optional[memfit.Line]
    memory_budget: Optional[memfit.Budget]
    say: Any  # the rank-0 progress printer (its .name is the recipe's)
    stop: Any  # runtime/stop_request.StopRequest: this rank's SIGTERM
    stopping: bool  # some rank had been asked to stop when this step's all-reduce ran: every rank ends here

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
            problem = None if plan.fits else plan.refusal(self.rank)
        try:
            self._stop_together(problem)
        except RuntimeError as e:  # one line, no traceback: the controller shows it as this rank's last line
            raise SystemExit(f"orch: {e}") from None

    def _make_memory_plan(self) -> memfit.Plan:
        share = self.balancer.share if self.balancer is not None else self.hp.batch_size
        mx.eval(self.model.parameters(), self.optimizer.state)
        points = [(b, self._probe_peak(b)) for b in sorted(set(memfit.probe_sizes(share)))]
        self._mlx_memory_fn("clear_cache")()
        return_freed_memory()  # the probes' freed buffers are not resident memory training adds to
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
        if self.quiet is not None and self.quiet.active:
            # Wait for this machine's slowest rank asleep (runtime/quiet_wait.py), so the collective
            # below only moves bytes instead of spinning on cores that rank needs.
            mx.eval(loss_sum, grad_sum)
            self.quiet.wait()
        # The stop flag travels with the loss: after the all-reduce every rank knows whether any rank had been
        # asked to stop (orch's SIGTERM reaches each rank's guard at its own moment; over SSH ms apart), so
        # all end at this same boundary and rank 0's final checkpoint never waits on a peer that has left.
        flag = mx.array(1.0 if self.stop.pending else 0.0, dtype=loss_sum.dtype)
        grads, loss_and_flag = self._average(grad_sum, mx.stack([loss_sum, flag]))
        if self.sharded is not None:
            self.sharded.update(self.model, grads)
        else:
            self.optimizer.update(self.model, grads)
        mx.eval(loss_and_flag, self.model.parameters(), self.optimizer.state)
        self.stopping = loss_and_flag[1].item() > 0
        self.step += 1
        return loss_and_flag[0], epoch

    def _average(self, grads: Any, loss: mx.array) -> tuple[Any, mx.array]:
        """Average gradients and loss over ranks (``gradcomm.GradientAverager``: one all-reduce,
        in ``--grad-dtype`` on the wire, results back in the gradients' own dtype)."""
        return self.averager(grads, loss)
