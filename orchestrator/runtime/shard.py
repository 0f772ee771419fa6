"""``--shard full``: parameters, gradients and optimizer state each about 1/N per rank (FSDP / ZeRO-3).

Built on MLX's own ``nn.fully_shard`` (whose gradient reduce-scatter is
``mx.distributed.sum_scatter``: on the ring and MPI orch's stand-in from
``collectives.py``), applied module by module rather than to the whole model:

* every *leaf* module that owns parameters (a ``Linear``, an ``Embedding``, a
  norm) whose parameters all divide by N along axis 0 is replaced, in place in
  the model's tree, by a ``FullyShardedModule`` of it. It keeps rank r's
  r-th part of each parameter's axis 0; its call all-gathers them, runs the
  layer and drops them again. The call is wrapped in ``mx.checkpoint``, so
  the backward pass gathers the layer once more instead of keeping every
  layer's full weights alive from the forward pass to the backward one: at
  any moment about one layer is whole. Its gradients come back reduce-scattered
  and already averaged over ranks.
* a leaf whose parameters do not divide (a 1-output head, a scalar) stays
  whole on every rank, and its gradients are averaged as in data parallelism;
  rank 0 names them in one line. So is a parameter that a module holds beside
  its sub-modules.
* the recipe's optimizer runs on the shards as they are (its state has their
  shapes), so any optimizer works, element-wise or not per row.

The model object stays the recipe's: the loss function calls it as before.
Checkpoints stay per-parameter, under the names the unsharded model has:
shards (and the optimizer state shaped like them) are gathered one array at
a time for a save, and a resume hands each rank its rows of what rank 0 read,
so a checkpoint of any world size, sharded or not, resumes here and back.

``FullShard`` has the interface of ``zero.ShardedOptimizer`` (``update``,
``state``, ``gather_state``, ``missing``, ``load_state``) so the trainer's
sharded paths (checkpoints, resume, the stop at a boundary) take it as they
are, plus what only this stage needs: ``gather_params`` for the model file,
``unsharded`` for a rank-0 evaluation, the averager and the wire metrics.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import FullyShardedModule, _maybe_shard
from mlx.utils import tree_flatten, tree_unflatten

from orchestrator.runtime import collectives
from orchestrator.runtime.telemetry import format_bytes

STAGES = ("none", "optimizer", "full")  # in order of more sharding (--shard auto picks the first that fits)


class Chain:
    """One order for every collective of the sharded model's graph: each starts after the previous one.

    The ring stand-in's sends and receives run on streams of their own, so in a graph that also holds
    ``all_gather`` s (the next layer's, recomputed in the backward pass) or another layer's reduce-scatter,
    nothing else would keep two of them off the same sockets at once. Each collective here takes the
    previous one's output as a dependency (``mx.depends``) and becomes ``token``; the order is the order
    the graph was built in, the same on every rank.
    """

    def __init__(self) -> None:
        self.token: Optional[mx.array] = None

    def after(self, x: mx.array) -> mx.array:
        return x if self.token is None else mx.depends(x, [self.token])

    def done(self, out: mx.array) -> mx.array:
        # The token is one new element computed from ``out``, not ``out`` (or a view of it): a view would
        # keep a layer's whole gathered buffer alive until the next collective ran.
        self.token = mx.multiply(out.reshape(-1)[:1], 0)
        return out

    def wait_for(self, arrays: list) -> None:
        """The next collective also waits for ``arrays`` (a layer's input: see ``CheckpointedShard``)."""
        arrays = [a for a in arrays if isinstance(a, mx.array)]
        if arrays:
            self.token = mx.depends(self.token, arrays) if self.token is not None else \
                mx.depends(arrays[0], arrays[1:]) if len(arrays) > 1 else arrays[0]


def _chained_gather_fn(group: mx.distributed.Group, chain: Chain, full_shapes: list, shard_sizes: list) -> Callable:
    """MLX's ``_make_gather_fn`` (one all_gather of the layer's shards; the gradient reduce-scattered and
    divided by N), with both collectives in ``chain`` and the reduce-scatter left in the graph."""
    n = group.size()
    split_at = list(itertools.accumulate(shard_sizes))[:-1]
    shard_shapes = [(shape[0] // n, *shape[1:]) for shape in full_shapes]

    @mx.custom_function
    def gather(shards):
        flat = mx.concatenate([s.reshape(1, -1) for s in shards], axis=1)
        full = chain.done(mx.distributed.all_gather(chain.after(flat), group=group))
        return [p.reshape(shape) for p, shape in zip(mx.split(full, split_at, axis=1), full_shapes)]

    @gather.vjp
    def gather_vjp(shards, cotangents, _):
        local_full = mx.concatenate([c.reshape(n, -1) for c in cotangents], axis=1)
        mine = chain.done(collectives.ordered_sum_scatter(local_full, chain.token, group=group)) / n
        return [p.reshape(shape).astype(s.dtype)
                for p, shape, s in zip(mx.split(mine, split_at, axis=1), shard_shapes, shards)]

    return gather


class CheckpointedShard(FullyShardedModule):
    """``nn.FullyShardedModule`` whose call is recomputed in the backward pass (``mx.checkpoint``), with its
    collectives in the model's ``Chain``.

    Without the recompute the forward pass's gathered weights of every layer stay alive until the
    backward pass used them: the whole model at once on every rank.
    """

    def __init__(self, module: nn.Module, group: mx.distributed.Group, chain: Chain) -> None:
        super().__init__(module, group=group)
        flat = tree_flatten(self.module.filter_and_map(_maybe_shard))
        n = group.size()
        self._gather_fn = _chained_gather_fn(group, chain, [(a.shape[0] * n, *a.shape[1:]) for _, a in flat],
                                             [a.size for _, a in flat])

        def call(params: dict, *args: Any, **kwargs: Any) -> Any:
            self.update(params)
            return FullyShardedModule.__call__(self, *args, **kwargs)

        object.__setattr__(self, "_checkpointed", mx.checkpoint(call))
        object.__setattr__(self, "_chain", chain)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._checkpointed(self.trainable_parameters(), *args, **kwargs)

    def _gathered_call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        # The gather waits for the layer's input: the gathers depend on nothing the forward pass computes,
        # so MLX would otherwise run every layer's all_gather first and hold all their weights at once.
        self._chain.wait_for(list(args))
        return super()._gathered_call(fn, *args, **kwargs)


def _child(parent: Any, seg: str) -> Any:
    return parent[int(seg)] if isinstance(parent, list) else parent[seg]


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    *head, last = path.split(".")
    parent: Any = root
    for seg in head:
        parent = _child(parent, seg)
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        parent[last] = new


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module without sub-modules that holds parameters, outermost first."""
    return [(path, m) for path, m in model.named_modules()
            if path and not m.children() and tree_flatten(m.parameters())]


def _divides(module: nn.Module, world: int) -> bool:
    return all(a.ndim > 0 and a.shape[0] % world == 0 for _, a in tree_flatten(module.parameters()))


class FullShard:
    """The model's leaves sharded in place, the optimizer on the shards (see the module doc)."""

    def __init__(self, model: nn.Module, optimizer: Any, group: mx.distributed.Group,
                 say: Callable[[str], None] = lambda _: None) -> None:
        self.model, self.optimizer, self.group = model, optimizer, group
        self.rank, self.world = group.rank(), group.size()
        self.chain = Chain()
        self.wrapped: list[str] = []  # paths of the sharded leaves
        replicated: list[str] = []
        if self.world > 1:
            collectives.install(group)  # under orch the bootstrap did it; this covers mlx.launch & co.
            for path, leaf in _leaves(model):
                if _divides(leaf, self.world):
                    _replace(model, path, CheckpointedShard(leaf, group, self.chain))
                    self.wrapped.append(path)
                else:
                    replicated.extend(f"{path}.{k}" for k, _ in tree_flatten(leaf.parameters()))
        sharded_names = {self.canonical(k) for k, _ in tree_flatten(model.parameters())
                         if self._wrapper_of(k) is not None}
        self.replicated = sorted(self.canonical(k) for k, _ in tree_flatten(model.parameters())
                                 if self.canonical(k) not in sharded_names)
        if self.world > 1 and self.replicated:
            shown = ", ".join(self.replicated[:4]) + (" ..." if len(self.replicated) > 4 else "")
            say(f"--shard full: {len(self.replicated)} parameter(s) stay whole on every rank (axis 0 does not "
                f"divide by {self.world}, or held by a module with sub-modules, as LoRA's adapters beside their "
                f"base layer are): {shown}")
        self.optimizer.init(model.trainable_parameters())

    # -- names: the unsharded model's ("layers.0.weight") <-> the wrapped one's ("layers.0.module.weight")

    def _wrapper_of(self, internal: str) -> Optional[str]:
        for path in self.wrapped:
            if internal.startswith(path + ".module."):
                return path
        return None

    def canonical(self, internal: str) -> str:
        path = self._wrapper_of(internal)
        return internal if path is None else path + "." + internal[len(path) + len(".module."):]

    def _is_shard(self, internal_key: str) -> bool:
        return self._wrapper_of(internal_key) is not None

    # -- the step --------------------------------------------------------------

    @property
    def state(self) -> dict:
        return self.optimizer.state

    def update(self, model: nn.Module, grads: Any) -> None:
        self.optimizer.update(model, grads)

    def averager(self, grads: Any, loss: mx.array) -> tuple[Any, mx.array]:
        """The loss averaged over ranks, with the gradients of the whole (replicated) parameters; the
        shards' gradients come out of ``sum_scatter`` already averaged."""
        if self.world == 1:
            return grads, loss
        flat = tree_flatten(grads)
        whole = [(k, self.chain.after(g)) for k, g in flat if not self._is_shard(k)]
        loss = self.chain.after(loss)  # after every reduce-scatter of the step (the Chain's doc)
        averaged = nn.average_gradients({"g": tree_unflatten(whole), "loss": loss}, group=self.group) \
            if whole else {"g": {}, "loss": mx.distributed.all_sum(loss, group=self.group) / self.world}
        self.chain.done(averaged["loss"])
        merged = [(k, g) for k, g in flat if self._is_shard(k)] + tree_flatten(averaged["g"])
        return tree_unflatten(merged), averaged["loss"]

    # -- checkpoints: the ordinary per-parameter format --------------------------

    def _gather(self, a: mx.array) -> mx.array:
        full = mx.distributed.all_gather(a, group=self.group)
        mx.eval(full)
        return full

    def gather_params(self) -> dict[str, mx.array]:
        """Every parameter whole, under its unsharded name. A collective; one array in flight at a time."""
        out = {}
        for k, a in tree_flatten(self.model.parameters()):
            out[self.canonical(k)] = self._gather(a) if self._is_shard(k) and self.world > 1 else a
        return out

    def _state_leaves(self) -> list[tuple[str, str, bool, mx.array]]:
        """(internal key, unsharded key, sharded?, array) of the optimizer state, in sorted order."""
        shapes = {k: a.shape for k, a in tree_flatten(self.model.parameters()) if self._is_shard(k)}
        out = []
        for key, a in sorted(tree_flatten(self.optimizer.state), key=lambda kv: kv[0]):
            param = key.rpartition(".")[0]
            sharded = self.world > 1 and param in shapes and isinstance(a, mx.array) and a.shape == shapes[param]
            out.append((key, self.canonical(key), sharded, a))
        return out

    def gather_state(self) -> dict[str, mx.array]:
        return {canon: (self._gather(a) if sharded else a) for _, canon, sharded, a in self._state_leaves()}

    def missing(self, full: dict[str, mx.array]) -> list[str]:
        problems = []
        for _, canon, sharded, a in self._state_leaves():
            want = (a.shape[0] * self.world, *a.shape[1:]) if sharded else a.shape
            if canon not in full:
                problems.append(canon)
            elif tuple(full[canon].shape) != tuple(want):
                problems.append(f"{canon} (shape {tuple(full[canon].shape)}, expected {tuple(want)})")
        return problems

    def load_state(self, full: Optional[dict[str, mx.array]]) -> None:
        """Each rank's rows of rank 0's per-parameter state ``full`` (a collective, one array at a time:
        rank 0 sends it as an all_sum where the others add zeros, bit-exact)."""
        state = []
        for key, canon, sharded, a in self._state_leaves():
            shape = (a.shape[0] * self.world, *a.shape[1:]) if sharded else a.shape
            mine = full[canon].astype(a.dtype) if self.rank == 0 else mx.zeros(shape, dtype=a.dtype)
            value = mx.distributed.all_sum(mine, group=self.group) if self.world > 1 else mine
            if sharded:
                rows = a.shape[0]
                value = mx.contiguous(value[self.rank * rows:(self.rank + 1) * rows])
            mx.eval(value)
            state.append((key, value))
        self.optimizer.state = tree_unflatten(state)

    # -- evaluation on rank 0 ------------------------------------------------------

    @contextlib.contextmanager
    def unsharded(self, active: bool = True) -> Iterator[None]:
        """Rank 0's model whole (the original leaves back, with gathered weights) for the block; the
        gathering is a collective, so every rank enters it with the same ``active``."""
        if not active or not self.wrapped:
            yield
            return
        wrappers = {p: self._leaf_wrapper(p) for p in self.wrapped}
        whole = {p: {k: self._gather(a) for k, a in tree_flatten(w.module.parameters())} for p, w in wrappers.items()}
        if self.rank != 0:
            del whole
            yield
            return
        shards = {p: w.module.parameters() for p, w in wrappers.items()}
        for p, w in wrappers.items():
            w.module.update(tree_unflatten(list(whole[p].items())))
            _replace(self.model, p, w.module)
        try:
            yield
        finally:
            for p, w in wrappers.items():
                w.module.update(shards[p])
                _replace(self.model, p, w)

    def _leaf_wrapper(self, path: str) -> CheckpointedShard:
        node: Any = self.model
        for seg in path.split("."):
            node = _child(node, seg)
        return node

    # -- what a step puts on the wire --------------------------------------------

    def shards_state(self) -> bool:
        """Whether any trainable parameter (so any optimizer state) is sharded: with LoRA, or where no axis 0
        divides by N, the optimizer state stays whole on every rank."""
        return any(self._is_shard(k) for k, _ in tree_flatten(self.model.trainable_parameters()))

    def wire_metrics(self) -> dict:
        """Per rank and step: the shards' all_gather twice (forward, and again in the recomputed backward),
        frozen shards included (LoRA's base layers are gathered too), and the trainable shards'
        reduce-scatter, (N-1)/N of the sharded bytes each; the whole trainable parameters' all-reduce
        2(N-1)/N of theirs, plus the loss and the stop flag."""
        n = self.world
        if n == 1:
            return {"allreduce_payload_bytes_per_step": 0, "bytes_sent_per_step": 0,
                    "shard_gather_bytes_per_step": 0, "shard_scatter_bytes_per_step": 0}
        flat = tree_flatten(self.model.trainable_parameters())
        gathered = sum(a.nbytes for k, a in tree_flatten(self.model.parameters()) if self._is_shard(k)) * n
        sharded = sum(a.nbytes for k, a in flat if self._is_shard(k)) * n
        whole = sum(a.nbytes for k, a in flat if not self._is_shard(k)) + 2 * 4  # + the loss and the stop flag
        gather = 2 * (n - 1) * gathered // n
        scatter = (n - 1) * sharded // n
        return {"allreduce_payload_bytes_per_step": whole,
                "bytes_sent_per_step": gather + scatter + 2 * (n - 1) * whole // n,
                "shard_gather_bytes_per_step": gather, "shard_scatter_bytes_per_step": scatter}


# -- --shard auto ------------------------------------------------------------------------------------------

GATHERED_LAYERS = 4  # a sharded layer's full weights, its gradient and their copies alive at once (measured)


def predicted_peaks(params_bytes: int, trainable_bytes: int, state_bytes: int, largest_leaf_bytes: int,
                    world: int) -> dict[str, int]:
    """Each stage's MLX peak per rank before activations: parameters, gradients, optimizer state, and the
    update's new parameters and state while the old are alive (ZeRO-1: plus the flat all_gather of the
    updated slices); measured: 821 MiB predicted 786 for data
    parallelism on a 112 MiB MLP with Adam; 286 vs 262 for ``full`` at N=4). The memory check's probes
    measure the activations afterwards."""
    n = max(1, world)
    p, t, s = params_bytes, trainable_bytes, state_bytes
    return {"none": p + 2 * t + 2 * s,
            "optimizer": p + 3 * t + 2 * s // n,  # + the all_gather of the updated slices, flat
            "full": (p + 2 * t + 2 * s) // n + (GATHERED_LAYERS * largest_leaf_bytes if n > 1 else 0)}


def state_ratio(optimizer: Any) -> float:
    """Optimizer state bytes per parameter byte (Adam: 2), from the state it makes for a small array."""
    state: dict = {}
    try:
        optimizer.init_single(mx.zeros((16,)), state)
    except Exception:  # noqa: BLE001 - an optimizer without init_single: assume Adam's
        return 2.0
    return sum(a.nbytes for _, a in tree_flatten(state) if isinstance(a, mx.array)) / 64


def choose_stage(model: nn.Module, optimizer: Any, world: int, gather: Callable[[float], list],
                 say: Callable[[str], None], sample: dict, budget: Any, kept_freed: int = 0) -> tuple[str, bool]:
    """``--shard auto``: the least sharding whose predicted peak fits every rank's budget, said in one line;
    and whether freed memory may still be kept (``runtime/allocator.py``).

    ``sample``: this rank's memory now (``MemorySampler.sample``); ``budget``: ``memfit.budget``'s (None:
    unknown, counts as fitting). ``kept_freed``: how far above MLX's peak a process keeping freed memory may
    sit (0: it does not keep it). When the tightest rank has less than that to spare beyond the chosen
    stage's peak, keeping would turn a stage that fits into an OOM kill (measured: ZeRO-1 picked under
    760-850 MiB cgroups was killed), so every rank stops keeping it. Every rank calls it (two collectives,
    through ``gather``).
    """
    params = tree_flatten(model.parameters())
    p = sum(a.nbytes for _, a in params)
    t = sum(a.nbytes for _, a in tree_flatten(model.trainable_parameters()))
    leaf = max((sum(a.nbytes for _, a in tree_flatten(m.parameters())) for _, m in _leaves(model)), default=0)
    peaks = predicted_peaks(p, t, int(t * state_ratio(optimizer)), leaf, world)
    other = max(0, sample["rss_bytes"] - sample["mlx_active_bytes"] - sample["mlx_cache_bytes"])
    # The model is already resident once (recipe.build): the prediction replaces it, not adds to it.
    limit = None if budget is None else budget.bytes - other
    # Nothing fits: the stage with the least predicted peak (on a small model, full's gathered layers can
    # outweigh what sharding saves), still said as not fitting.
    smallest = min(range(3), key=lambda i: (peaks[STAGES[i]], -i))
    need = next((i for i, s in enumerate(STAGES[:3]) if limit is None or peaks[s] <= limit), smallest)
    stage = STAGES[int(max(gather(float(need))))]
    tightest = min(gather(float("inf") if limit is None else float(limit)))
    shown = ", ".join(f"{s} {format_bytes(peaks[s])}" for s in STAGES[:3])
    if tightest == float("inf"):
        why = "no rank knows its memory budget"
    elif peaks[stage] <= tightest:
        why = f"the least sharding that fits the tightest rank's {format_bytes(int(tightest))} for MLX"
    else:
        why = (f"nothing fits the tightest rank's {format_bytes(int(max(tightest, 0)))} for MLX beside the process's "
               "own memory: the least predicted peak")
    keep = kept_freed <= 0 or tightest == float("inf") or tightest - peaks[stage] >= kept_freed
    spare = "" if keep else (f"; freed memory goes back to the system: {format_bytes(int(max(tightest - peaks[stage], 0)))}"
                             f" to spare is less than the {format_bytes(kept_freed)} a kept heap can hold")
    say(f"--shard auto: {stage} ({why}; predicted MLX peak per rank before activations: {shown}){spare}")
    return stage, keep
