"""The gradient all-reduce: average over ranks, optionally in a narrower dtype on the wire.

Data parallelism moves every gradient byte across the ring each step, so on a
slow link the all-reduce is the step. ``--grad-dtype bfloat16`` halves those
bytes: each float32 gradient is cast to bfloat16 *only for the collective*,
summed over ranks in bfloat16, cast straight back and divided by N. Gradient
accumulation before it, and the optimizer update after it, stay in float32, so
the only precision lost is one rounding of each rank's gradient plus the
rounding of the ring's additions (8 significand bits; float16 keeps 11 but
overflows above 65504, hence bfloat16 is the usual choice).

The loss rides in the same buffer as the gradients when they share its dtype
(one round trip per step); with a narrower wire dtype it gets its own tiny
float32 all_sum instead, so the reported loss keeps float32 precision.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

BUCKET_BYTES = 32 * 1024**2  # as nn.average_gradients' default all_reduce_size
PIPE_BYTES = 1024**2  # narrow wire: bucket size on the wire, small enough to pipeline cast, wire and cast back
# A narrow wire dtype pays only where bytes decide the time. Below this many bytes on the narrow wire the
# all-reduce is latency-bound, there is nothing to pipeline (one or two buckets), and the narrow path's
# second collective (the float32 loss), casts and stream only cost: measured on 2 ranks of the 2-core box,
# the default benchmark model's 0.28 MiB in bfloat16 averaged in 5.0-8.2 ms against 0.8-2.9 ms in float32,
# and the mere existence of one more CPU stream made each later eval of a collective ~2.3 ms slower. Such
# gradients go in float32 (exact), in one all-reduce with the loss, and no stream is made.
NARROW_MIN_BYTES = 2 * PIPE_BYTES
WIRE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def wire_dtype(name: str) -> mx.Dtype:
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise SystemExit(f"--grad-dtype {name!r}: choose one of {', '.join(WIRE_DTYPES)}") from None


def memory_order(a: mx.array) -> Optional[tuple[int, ...]]:
    """The axis order ``p`` for which ``a.transpose(p)`` is row-contiguous; None if ``a`` already is.

    Reads the strides MLX exports through the buffer protocol (which evaluates
    ``a``); None too when ``a`` is not a dense permutation of a contiguous array.
    """
    try:
        mv = memoryview(a)
    except (TypeError, ValueError, BufferError):  # a dtype the buffer protocol cannot describe
        return None
    if mv.c_contiguous or a.ndim < 2:
        return None
    order = sorted(range(a.ndim), key=lambda i: -mv.strides[i])
    expect = mv.itemsize
    for i in reversed(order):
        if a.shape[i] != 1 and mv.strides[i] != expect:
            return None
        expect *= a.shape[i]
    return tuple(order)


def inverse_permutation(order: tuple[int, ...]) -> list[int]:
    inverse = [0] * len(order)
    for i, axis in enumerate(order):
        inverse[axis] = i
    return inverse


def _narrows(dtype: mx.Dtype, wire: mx.Dtype) -> bool:
    return mx.issubdtype(dtype, mx.floating) and dtype.size > wire.size


class GradientAverager:
    """``averager(grads, loss) -> (grads, loss)`` averaged over ``group``, in one all-reduce where possible.

    ``nn.average_gradients`` does the bucketing (only the tree and group are
    passed: its other parameters differ across MLX versions, 0.32 dropped
    ``communication_type``).

    ``nn.Linear`` weight gradients come out of ``value_and_grad`` column-major,
    and flattening them for the all-reduce forces a slow transposing copy of
    each (measured: average_gradients took 2-4x the time of a raw all_sum of
    the same bytes). So each gradient is handed over as a transposed *view*
    that is row-contiguous in its own memory order — flattening it (or casting
    it to the wire dtype) is then a straight copy — and transposed back
    afterwards (a view again). The arithmetic is unchanged: with float32 on the
    wire the results are bit-identical to ``nn.average_gradients(grads)``.
    """

    def __init__(self, group: mx.distributed.Group, dtype: str = "float32") -> None:
        self.group = group
        self.world = group.size()
        self.wire = wire_dtype(dtype)
        self._order: Optional[dict[str, Optional[tuple[int, ...]]]] = None
        self._fused: dict = {}
        self._comm: Optional[mx.Stream] = None

    @property
    def comm(self) -> mx.Stream:
        """The collectives' own CPU stream (MLX runs each stream on its own thread), so casts overlap
        the wire; made on first use, by a wire that narrows (see ``NARROW_MIN_BYTES``)."""
        if self._comm is None:
            self._comm = mx.new_stream(mx.cpu)
        return self._comm

    def __call__(self, grads: Any, loss: mx.array) -> tuple[Any, mx.array]:
        if self.world == 1:
            return grads, loss
        flat = tree_flatten(grads)
        if self._order is None:  # layouts are fixed by the graph: read them once
            mx.eval([g for _, g in flat])
            self._order = {k: memory_order(g) for k, g in flat}
        views = [(k, g.transpose(self._order[k]) if self._order.get(k) else g) for k, g in flat]

        if not self.narrows([g for _, g in views]):
            if {g.dtype for _, g in views} != {loss.dtype}:
                # Mixed dtypes: average_gradients falls back to one all_sum per array anyway.
                averaged = nn.average_gradients(tree_unflatten(views), group=self.group)
                return self._restore(averaged, {}), self._average_loss(loss)
            both = nn.average_gradients({"grads": tree_unflatten(views), "loss": loss}, group=self.group)
            return self._restore(both["grads"], {}), both["loss"]

        # Every collective of the narrow path runs on one stream, in this order on every rank: two
        # threads must never drive the ring at once. The loss goes first, so anything that waits
        # for the gradients (the sharded optimizer's all_gather) also finds the loss's sum done.
        stream = self.comm
        avg_loss = mx.distributed.all_sum(loss, group=self.group, stream=stream) / self.world
        by_dtype: dict[mx.Dtype, list[tuple[str, mx.array]]] = {}
        for k, g in views:
            by_dtype.setdefault(g.dtype, []).append((k, g))
        averaged: list[tuple[str, mx.array]] = []
        for dtype, members in by_dtype.items():
            if _narrows(dtype, self.wire):
                averaged.extend(self._narrow_average(members, dtype, stream))
            else:
                averaged.extend(tree_flatten(nn.average_gradients(
                    tree_unflatten(members), group=self.group, communication_stream=stream)))
        return self._restore(tree_unflatten(averaged), {}), avg_loss

    def narrows(self, arrays: list) -> bool:
        """Whether gradients like ``arrays`` travel in the narrow wire dtype: at least ``NARROW_MIN_BYTES``
        of them would. Decided from shapes and dtypes alone, so every rank decides the same."""
        if self.wire == mx.float32:
            return False
        return sum(a.size * self.wire.size for a in arrays if _narrows(a.dtype, self.wire)) >= NARROW_MIN_BYTES

    def payload_bytes(self, params: Any) -> int:
        """Bytes one rank contributes to a step's all-reduce: every gradient (shaped like ``params``)
        in the dtype it travels in, plus the loss and the stop flag. What ``--grad-dtype`` halves."""
        arrays = [p for _, p in tree_flatten(params)]
        narrow = self.narrows(arrays)
        total = 2 * 4  # the float32 loss and the stop flag beside it (runtime/train_step.py)
        for p in arrays:
            total += p.size * (self.wire.size if narrow and _narrows(p.dtype, self.wire) else p.dtype.size)
        return total

    def _narrow_average(self, members: list[tuple[str, mx.array]], dtype: mx.Dtype,
                        stream: mx.Stream) -> list[tuple[str, mx.array]]:
        """Cast, all_sum in the wire dtype, cast back and divide: pipelined, bucket by bucket.

        Casting and dividing are the CPU cost that eats into the halved
        transfer, so both are fused kernels (``mx.compile``; measured on the
        default 28.7 MB benchmark model, the cast back plus divide took 5 ms
        fused against 34 ms as ``nn.average_gradients``' divide in bfloat16
        followed by a per-array cast). And they overlap the wire: every
        collective runs on its own CPU stream (``self.comm``: MLX runs each
        stream on its own thread, and the ring's all_sum blocks only that
        one), in buckets of ~``PIPE_BYTES``, so bucket k+1 is cast and bucket
        k-1 cast back while bucket k is on the wire. A gradient at least half
        a bucket big is a bucket of its own and is cast straight to the wire
        buffer (no concatenate); smaller ones share a bucket.

        The collectives are started here (``mx.async_eval``) so that the cast
        of every bucket is queued on the compute stream ahead of the first
        cast back, which would otherwise wait for its bucket's transfer with
        the next bucket's cast queued behind it.
        """
        pack, unpack = self._kernels(dtype)
        buckets: list[list[tuple[str, mx.array]]] = []
        small: list[tuple[str, mx.array]] = []
        size = 0
        for k, g in members:
            nbytes = g.size * self.wire.size
            if nbytes >= PIPE_BYTES // 2:
                buckets.append([(k, g)])
                continue
            small.append((k, g))
            size += nbytes
            if size >= PIPE_BYTES:
                buckets.append(small)
                small, size = [], 0
        if small:
            buckets.append(small)
        sums = [mx.distributed.all_sum(pack(*[g for _, g in b]), group=self.group, stream=stream) for b in buckets]
        mx.async_eval(sums)
        out = []
        for bucket, summed in zip(buckets, sums):
            flat, offset = unpack(summed), 0
            for key, g in bucket:
                out.append((key, flat[offset:offset + g.size].reshape(g.shape)))
                offset += g.size
        return out

    def _kernels(self, dtype: mx.Dtype):
        """(pack, unpack) for gradients of ``dtype``: fused by ``mx.compile`` where it works here."""
        if dtype not in self._fused:
            wire, world = self.wire, self.world

            def pack(*arrays):
                if len(arrays) == 1:  # a bucket of one: the cast alone writes the wire buffer
                    return arrays[0].reshape(-1).astype(wire)
                return mx.concatenate([a.reshape(-1).astype(wire) for a in arrays])

            def unpack(buf):
                return buf.astype(dtype) / world

            try:  # compiling needs a working JIT (a C++ compiler for MLX's CPU backend): probe it once
                fused = mx.compile(pack), mx.compile(unpack)
                mx.eval(fused[1](fused[0](mx.zeros((4,), dtype=dtype))))
            except Exception:  # noqa: BLE001 - any failure: the plain graph is correct, just slower
                fused = pack, unpack
            self._fused[dtype] = fused
        return self._fused[dtype]

    def _average_loss(self, loss: mx.array) -> mx.array:
        return mx.distributed.all_sum(loss, group=self.group) / self.world

    def _restore(self, averaged: Any, dtypes: dict[str, mx.Dtype]) -> Any:
        """Back to each gradient's own dtype and axis order (both cheap: a cast and a view)."""
        back = []
        for k, g in tree_flatten(averaged):
            if k in dtypes and g.dtype != dtypes[k]:
                g = g.astype(dtypes[k])
            order = self._order.get(k) if self._order else None
            back.append((k, g.transpose(inverse_permutation(order)) if order else g))
        return tree_unflatten(back)
