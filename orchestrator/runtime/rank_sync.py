"""What the ranks of one training agree on, and how they stay in agreement: the trainer's collectives outside the step.

Only rank 0 reads checkpoints (it is the only one guaranteed to have them when
ranks live on different hosts), so a resume is rank 0 loading and every rank
taking rank 0's weights, optimizer state, data position and balance shares
(``broadcast_from_rank0``: an ``all_sum`` where the other ranks add zeros,
bit-exact). Before that, every rank checks that it built the same model as
rank 0, and any rank's problem stops *every* rank (``_stop_together``), so none
is left waiting in a collective that will never complete. ``_gather`` is the
balancer's view of every rank's speed.

``RankSync`` is one part of ``runtime/trainer.py``'s ``Trainer`` (with
``runtime/train_step.py``'s ``TrainStep``): it works on the trainer's state
(model, optimizer, group, step, data position) and is never used alone.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from orchestrator.runtime import checkpoint as ckpt
from orchestrator.runtime.data import DataPosition


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


def _first_words(message: str, limit: int = 160) -> str:
    """One line of a loader's message (MLX names every parameter that does not fit: 42 names in one line)."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


class RankSync:
    """Resume, start from rank 0's state, stop together, gather: the ``Trainer``'s agreement across ranks."""

    # The trainer's state this part reads and sets (``Trainer.__init__`` makes it).
    hp: Any
    group: mx.distributed.Group
    rank: int
    world: int
    model: Any
    optimizer: Any
    sharded: Any
    step: int
    position: DataPosition
    resumed_from: Optional[Path]
    _resume_optimizer: Optional[dict]
    _resume_shares: Optional[list]
    ckpt_root: Path
    say: Callable[[str], None]

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
                if self.hp.shard_optimizer or self.hp.shard in ("full", "auto"):  # sliced later
                    self._resume_optimizer = opt_arrays
                else:
                    self.optimizer.state = tree_unflatten(list(opt_arrays.items()))
            except (ckpt.CheckpointError, ValueError) as e:
                errors.append(f"{cand.path}: {_first_words(str(e))}")
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

    def _stop_together(self, problem: Optional[str], bad_input: bool = False) -> None:
        """Raise on *every* rank if any rank has a problem, so none is left waiting in a collective.

        ``bad_input``: the problem is the user's to fix (a ``--resume`` path that is not there, a checkpoint of
        another model): the rank that found it says it in one line and every rank exits 2, no traceback."""
        failed = 0
        if self.world > 1:
            failed = mx.distributed.all_sum(mx.array(int(problem is not None)), group=self.group).item()
        if problem and bad_input:
            print(f"orch: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        if problem:
            raise RuntimeError(problem)
        if failed and bad_input:  # the rank that found it said why; this line marks us as its casualty (diagnose.py)
            print(f"orch: stopping: {failed} other rank(s) failed to start (see their output)", file=sys.stderr, flush=True)
            raise SystemExit(2)
        if failed:
            raise RuntimeError(f"stopping: {failed} other rank(s) failed to start (see their output)")

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
