"""ZeRO-1 on the ring: each rank keeps the optimizer state of only 1/N of the parameters.

Adam keeps two float32 moments per parameter, so its state is twice the model;
under plain data parallelism every rank holds all of it. With
``--shard-optimizer`` each rank instead:

1. gets the full averaged gradients from the usual all-reduce (MLX's ring and
   MPI backends have no reduce-scatter, so ZeRO-1 rather than ZeRO-2);
2. flattens parameters and gradients, per dtype, into one logical vector
   (parameters in sorted-name order, row-major) and takes its slice
   ``[r*k, (r+1)*k)``, ``k = ceil(n / N)`` (the last slice is zero-padded);
3. runs the recipe's optimizer on that slice only, so the optimizer's state
   has shape ``(k,)`` per moment;
4. ``all_gather``s the updated slices and rebuilds every parameter from the
   gathered vector (reshaped views, no copy).

This is exact only for optimizers that act element by element (SGD, Adam &
co.); an optimizer that looks at a parameter's shape (Adafactor's factored
moments, Muon) would compute something else on a flat slice, so it is refused.

Checkpoints stay in the ordinary per-parameter format: at a checkpoint the
slices are gathered and cut back into per-parameter arrays, and on resume the
per-parameter arrays rank 0 read are re-sliced. So a checkpoint written by N
sharded ranks resumes on M ranks, sharded or not, and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

# Optimizers whose update of each element depends only on that element's gradient and state.
ELEMENTWISE = (optim.SGD, optim.RMSprop, optim.Adagrad, optim.AdaDelta, optim.Adam, optim.AdamW,
               optim.Adamax, optim.Lion)


@dataclass(frozen=True)
class Piece:
    """One parameter inside its dtype group's flat vector: elements ``[start, start + size)``."""

    key: str
    shape: tuple[int, ...]
    start: int
    size: int


@dataclass(frozen=True)
class FlatGroup:
    """All parameters of one dtype as one vector of ``total`` elements, cut in ``world`` slices of ``shard``."""

    name: str
    dtype: mx.Dtype
    pieces: tuple[Piece, ...]
    total: int
    shard: int

    def bounds(self, rank: int) -> tuple[int, int]:
        """Rank ``rank``'s real elements ``[lo, hi)`` (may be empty at the end)."""
        lo = min(rank * self.shard, self.total)
        return lo, min(lo + self.shard, self.total)

    def slice(self, arrays: dict[str, mx.array], rank: int) -> mx.array:
        """Elements ``[lo, lo + shard)`` of the flattened ``arrays``, zero-padded to ``shard``."""
        lo, hi = self.bounds(rank)
        parts = []
        for p in self.pieces:
            a, b = max(lo, p.start), min(hi, p.start + p.size)
            if a < b:
                parts.append(arrays[p.key].reshape(-1)[a - p.start:b - p.start])
        if hi - lo < self.shard:
            parts.append(mx.zeros((self.shard - (hi - lo),), dtype=self.dtype))
        return mx.concatenate(parts) if len(parts) > 1 else mx.contiguous(parts[0])

    def full(self, arrays: dict[str, mx.array]) -> mx.array:
        return mx.concatenate([arrays[p.key].reshape(-1) for p in self.pieces])

    def split(self, vector: mx.array) -> list[tuple[str, mx.array]]:
        """Per-parameter arrays from a vector of at least ``total`` elements (views into it)."""
        return [(p.key, vector[p.start:p.start + p.size].reshape(p.shape)) for p in self.pieces]


def layout(params: list[tuple[str, mx.array]], world: int) -> dict[str, FlatGroup]:
    """One :class:`FlatGroup` per parameter dtype; parameters in sorted-name order (the same on every rank)."""
    by_dtype: dict[str, list[tuple[str, mx.array]]] = {}
    for key, p in sorted(params, key=lambda kv: kv[0]):
        by_dtype.setdefault(str(p.dtype).rsplit(".", 1)[-1], []).append((key, p))
    groups = {}
    for name, members in sorted(by_dtype.items()):
        pieces, start = [], 0
        for key, p in members:
            pieces.append(Piece(key, tuple(p.shape), start, p.size))
            start += p.size
        shard = max(1, -(-start // world))
        groups[name] = FlatGroup(name, members[0][1].dtype, tuple(pieces), start, shard)
    return groups


def _without_copy(view: mx.array) -> mx.array:
    """A copy of ``view`` that does not keep the (possibly huge) buffer it is a view of alive."""
    out = mx.contiguous(view)
    mx.eval(out)
    return out


class ShardedOptimizer:
    """Wraps the recipe's optimizer so it only ever sees this rank's slice of the parameters.

    ``state`` is the wrapped optimizer's state: ``step``/``learning_rate`` as
    usual, plus one entry per dtype group (``"float32": {"m": (k,), "v": (k,)}``
    for Adam).
    """

    def __init__(self, optimizer: optim.Optimizer, model: nn.Module, group: mx.distributed.Group) -> None:
        if type(optimizer) not in ELEMENTWISE:
            raise SystemExit(
                f"--shard-optimizer: {type(optimizer).__name__} is not known to update parameters element by "
                f"element, so it cannot run on flat slices; use one of "
                f"{', '.join(c.__name__ for c in ELEMENTWISE)} or drop --shard-optimizer"
            )
        self.optimizer, self.group = optimizer, group
        self.rank, self.world = group.rank(), group.size()
        self.groups = layout(tree_flatten(model.trainable_parameters()), self.world)
        self.optimizer.init(self._slices(dict(tree_flatten(model.trainable_parameters()))))

    @property
    def state(self) -> dict:
        return self.optimizer.state

    def _slices(self, arrays: dict[str, mx.array]) -> dict[str, mx.array]:
        return {name: g.slice(arrays, self.rank) for name, g in self.groups.items()}

    def update(self, model: nn.Module, grads: Any) -> None:
        """Update this rank's slice, gather every rank's, and put the full parameters back into ``model``.

        Every collective here runs in one order on every rank: the all-reduce of the gradients
        (and the loss) is evaluated first, then each dtype group's all_gather on its own. In one
        lazy graph the ranks' graphs differ (each slices other parameters), MLX may schedule the
        collectives in another order on each rank, and the ring then mixes their bytes: at 4 ranks
        on a 118 MB model the averaged loss differed per rank and turned nan at step 2.
        """
        if self.world > 1:
            mx.eval(grads)
        new = self.optimizer.apply_gradients(
            self._slices(dict(tree_flatten(grads))), self._slices(dict(tree_flatten(model.trainable_parameters())))
        )
        if self.world > 1:
            # The slices first: in one graph with the all_gather, the slicing's transients (a whole copy of
            # each column-major gradient) were alive beside the gathered vector (118 MB MLP with Adam at
            # N=4: MLX peak 739 -> 595 MiB, what shard.predicted_peaks counts).
            mx.eval(new)
        rebuilt = []
        for name, g in self.groups.items():
            vector = mx.distributed.all_gather(new[name], group=self.group) if self.world > 1 else new[name]
            if self.world > 1:
                mx.eval(vector)
            rebuilt.extend(g.split(vector))
        model.update(tree_unflatten(rebuilt))

    # -- the ordinary per-parameter format, for checkpoints ------------------

    def _sharded_leaves(self) -> list[tuple[str, Optional[FlatGroup], str, mx.array]]:
        """``(state key, its group or None for step/learning_rate & co., key inside the group, array)``."""
        out = []
        for key, a in sorted(tree_flatten(self.optimizer.state), key=lambda kv: kv[0]):
            head, _, rest = key.partition(".")
            g = self.groups.get(head)
            if g is not None and rest and a.shape == (g.shard,):
                out.append((key, g, rest, a))
            else:
                out.append((key, None, key, a))
        return out

    def gather_state(self) -> dict[str, mx.array]:
        """The full optimizer state as ordinary per-parameter arrays (``layers.0.weight.m``...).

        A collective: every rank must call it. Each moment is gathered and cut
        up one at a time, so at most one full moment vector is in flight.
        """
        full: dict[str, mx.array] = {}
        for key, g, rest, a in self._sharded_leaves():
            if g is None:
                full[key] = a
                continue
            vector = mx.distributed.all_gather(a, group=self.group) if self.world > 1 else a
            parts = g.split(vector)
            mx.eval([v for _, v in parts])
            full.update((f"{pkey}.{rest}", v) for pkey, v in parts)
        return full

    def missing(self, full: dict[str, mx.array]) -> list[str]:
        """Keys (with wrong shapes) of ``full`` that :meth:`load_state` needs; empty if it has them all."""
        problems = []
        for key, g, rest, a in self._sharded_leaves():
            if g is None:
                if key not in full:
                    problems.append(key)
                continue
            for p in g.pieces:
                name = f"{p.key}.{rest}"
                if name not in full:
                    problems.append(name)
                elif tuple(full[name].shape) != p.shape:
                    problems.append(f"{name} (shape {tuple(full[name].shape)}, expected {p.shape})")
        return problems

    def load_state(self, full: Optional[dict[str, mx.array]]) -> None:
        """Take this rank's slices of rank 0's per-parameter state ``full`` (ignored on other ranks).

        A collective: every rank must call it, rank 0 with what it read
        (checked with :meth:`missing` first). One moment at a time goes out
        from rank 0 as an ``all_sum`` where the others add zeros (bit-exact).
        """
        state = []
        for key, g, rest, a in self._sharded_leaves():
            if g is None:
                mine = full[key] if self.rank == 0 else mx.zeros_like(a)
            else:
                mine = g.full({p.key: full[f"{p.key}.{rest}"] for p in g.pieces}) if self.rank == 0 \
                    else mx.zeros((g.total,), dtype=a.dtype)
            value = mx.distributed.all_sum(mine, group=self.group) if self.world > 1 else mine
            if g is not None:
                value = _slice_vector(value, g, self.rank)
            state.append((key, _without_copy(value.astype(a.dtype))))
        self.optimizer.state = tree_unflatten(state)


def _slice_vector(vector: mx.array, g: FlatGroup, rank: int) -> mx.array:
    lo, hi = g.bounds(rank)
    part = vector[lo:hi]
    if hi - lo < g.shard:
        part = mx.concatenate([part, mx.zeros((g.shard - (hi - lo),), dtype=vector.dtype)])
    return part


def state_bytes(state: Any) -> int:
    """Bytes held by an optimizer state tree (what ``--shard-optimizer`` divides by N)."""
    return sum(a.nbytes for _, a in tree_flatten(state) if isinstance(a, mx.array))
