"""``sum_scatter`` for the backends that have none (ring, MPI), so ``nn.fully_shard`` trains there.

MLX 0.32's fully sharded training (``nn.fully_shard``) reduce-scatters every
gradient with ``mx.distributed.sum_scatter``, which only NCCL and JACCL
implement: the ring raises ``[ring] sum_scatter not supported.`` and MPI
``[mpi] sum_scatter not yet implemented.``. Both have what a reduce-scatter
needs, and ``fully_shard`` looks the op up at call time, so ``install()``
(called by the bootstrap right after ``mx.distributed.init``) puts
``sum_scatter`` below in its place wherever the group's backend lacks one.

What it computes is exactly MLX's op: ``x``'s axis 0 is split into N equal
parts and rank r gets the sum over ranks of part r, in ``x``'s dtype (each
addition of a half-precision partial sum is done in float32 and rounded once,
as the ring's own ``all_sum`` does); a group of one returns ``x``; an axis 0
that does not divide by N is refused on every rank, before anything is sent,
with the same ``ValueError`` MLX raises.

How, chosen by group size and backend:

* **N = 2: one ``all_gather`` of half the buffer.** Each rank contributes the
  half the other one needs and adds what it gets to its own half. That is the
  ring reduce-scatter's byte count ((N-1)/N of the buffer per rank), and the
  ring's ``all_gather`` drives both of its sockets at once, where ``send`` on
  a two-rank ring always takes the same one (MLX picks the "right" neighbour's
  socket for rank 1, which is also the left one).
* **N > 2 on the ring: the classic ring reduce-scatter, both ways round.**
  N-1 steps; at each a rank sends one partial chunk to a neighbour, receives
  one from the other and adds its own part. Half the columns go clockwise and
  half counter-clockwise, as MLX's ``all_sum`` splits its buffer, so both
  directions of every link carry (N-1)/(2N) of the buffer: half of what
  ``all_sum`` puts on them. Each direction's chunks go in pieces of up to
  ``PIECE_BYTES`` (at most ``MAX_PIECES``) so the addition of piece p overlaps
  the transfer of piece p+1.

  The ring's ``send``/``recv`` block until the peer takes the bytes, so on one
  stream every rank would block in its send. Each direction therefore sends on
  one CPU stream and receives (and adds) on another (MLX runs each stream on a
  thread of its own): four streams, made on first use.
* **N > 2 elsewhere (MPI): the same ring, one direction, on one stream.**
  MLX calls MPI from its stream threads after a plain ``MPI_Init`` (no
  ``MPI_THREAD_MULTIPLE``), so two threads must never be inside MPI at once:
  every send and receive runs on the caller's stream, even ranks sending
  before they receive and odd ranks the other way round (so no cycle of
  blocked sends can form, as long as one rank receives first: rank 1 does).

**Order is everything.** ``recv`` has no inputs, so nothing in the graph says
which of two receives on a stream runs first, and MLX dispatches ops in the
order its ``eval`` walks the graph; a receive that runs early reads another
step's bytes. Each receive is therefore made the first input of a
``mx.depends`` on the op that must precede it, and each send's input depends
on the previous send: MLX's walk puts a node only after all its consumers, so
this fixes every stream's order to the step order on every rank, which is
what keeps the ring deadlock-free (the lowest unfinished step can always
proceed on both of its ends).

Nor may anything else use the sockets (or MPI) meanwhile: another collective
of the caller's graph (``fully_shard``'s ``all_gather`` s, an ``all_sum`` of the
loss, another layer's reduce-scatter) would interleave its bytes with these.
So ``sum_scatter`` evaluates ``x`` and then its own steps in an ``eval`` of
their own (``_evaluated``). Inside ``value_and_grad`` that keeps the forward
pass alive (tracers are not freed after an ``eval``), so the runtime's
``--shard full`` instead calls ``ordered_sum_scatter``, which stays in the
graph and starts after a token: it puts every collective of its graph in one
chain itself (``runtime/shard.py``).

``ORCH_SUM_SCATTER=off`` (``protocol.ENV_SUM_SCATTER``) leaves MLX's op alone.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import mlx.core as mx

from orchestrator import protocol

# Backends whose sum_scatter raises (MLX 0.32); NCCL and JACCL have their own and keep it.
LACKING = frozenset({"ring", "mpi"})
NATIVE = frozenset({"nccl", "jaccl"})
PIECE_BYTES = 4 << 20
MAX_PIECES = 4
# Below this many bytes per chunk one direction and one piece: latency, not bytes, decides.
BOTH_WAYS_MIN_BYTES = 64 << 10

_native = getattr(mx.distributed, "sum_scatter", None)
_state: dict = {"backend": None, "streams": None, "said": False}


def _refuse_shape(x: mx.array, n: int) -> None:
    if x.ndim == 0 or x.shape[0] % n != 0:
        raise ValueError(
            f"[sum_scatter] Invalid shape={tuple(x.shape)} for a group of size {n}: axis 0 must divide by {n} "
            f"(pad it to a multiple of {n})")


def sum_scatter(x: mx.array, group: Optional[mx.distributed.Group] = None,
                stream: Optional[mx.Stream] = None) -> mx.array:
    """``mx.distributed.sum_scatter``'s result (``all_sum(x)`` sliced to this rank's part of axis 0), built
    from the backend's ``all_gather`` (N = 2) or ``send``/``recv`` (a ring reduce-scatter)."""
    return _sum_scatter(x, group, stream, after=None)


def ordered_sum_scatter(x: mx.array, after: Optional[mx.array], group: Optional[mx.distributed.Group] = None
                        ) -> mx.array:
    """``sum_scatter`` left in the caller's graph (nothing is evaluated), starting only once ``after`` is
    there: for a caller that puts *every* collective of its graph in one chain (``runtime/shard.py``),
    so none can share the sockets with this one. The ring's own stand-in is used whatever the backend.

    What that buys over ``sum_scatter``'s own ``eval``: inside ``value_and_grad`` arrays are tracers,
    which MLX does not free after an ``eval``, so an ``eval`` there keeps the whole forward pass (every
    layer's gathered weights) alive until the gradients are done.
    """
    backend = _state["backend"] or (os.environ.get(protocol.ENV_BACKEND) or "").strip().lower()
    if backend in NATIVE and _native is not None:  # NCCL, JACCL: their own op, in the same order
        return _native(x if after is None else mx.depends(x, [after]), group=group)
    return _sum_scatter(x, group, None, after=after)


def _sum_scatter(x: mx.array, group, stream, after: Optional[mx.array]) -> mx.array:
    if group is None:
        group = mx.distributed.init()
    n = group.size()
    if n == 1:
        return x
    _say_once(group)
    _refuse_shape(x, n)
    r = group.rank()
    out_shape = (x.shape[0] // n, *x.shape[1:])
    if x.size == 0:
        return mx.zeros(out_shape, dtype=x.dtype)
    vector = x.reshape(-1)
    if after is not None:
        vector = mx.depends(vector, [after])
    flat = _Flat(vector, n)
    if n == 2:
        return _pair(flat, r, group, stream).reshape(out_shape)
    eager = after is None and _evaluated(flat.x)
    if (_state["backend"] or (os.environ.get(protocol.ENV_BACKEND) or "").strip().lower()) == "ring":
        mine = _ring_both_ways(flat, n, r, group)
    else:
        mine = _ring_one_stream(flat, n, r, group, stream)
    if eager:
        mx.eval(mine)
    return mine.reshape(out_shape)


def _evaluated(x: mx.array) -> bool:
    """Evaluate ``x`` now, so the ring's sends and receives run in an ``eval`` of their own; False inside
    ``mx.compile`` (which forbids it: the steps then stay in the caller's graph).

    Alone in their ``eval`` nothing else can drive the backend's sockets (or MPI) at the same time: not
    the collectives that produce ``x`` (``fully_shard``'s ``all_gather`` s), nor one the caller's graph
    holds independently of it (``all_sum(loss)`` beside the gradients), nor another ``sum_scatter``
    whose steps would interleave with these in a different order on the send and receive streams.
    Receives have no inputs, so in a shared graph they could start while those still run. ``x`` is
    what the caller's backward pass was going to compute anyway; only the overlap of this
    reduce-scatter with later compute is lost.
    """
    try:
        mx.eval(x)
        return True
    except ValueError as e:
        if "function transformations" not in str(e):
            raise
        return False


class _Flat:
    """``x`` as one vector of N chunks; ``part(k, a, b)`` is elements ``[a, b)`` of chunk k.

    Flat 1-D slices, not rows of an (N, -1) view: MLX adds those through its contiguous kernel, 2-3x
    faster than the same rows sliced out of a 2-D array (measured on 32 MiB).
    """

    def __init__(self, x: mx.array, n: int) -> None:
        self.x, self.cols, self.dtype = x, x.size // n, x.dtype

    def part(self, k: int, a: int = 0, b: Optional[int] = None) -> mx.array:
        base = k * self.cols
        return self.x[base + a:base + (self.cols if b is None else b)]


def _pair(flat: _Flat, r: int, group, stream) -> mx.array:
    """Two ranks: gather the half each needs from the other, add it to one's own."""
    gathered = mx.distributed.all_gather(flat.part(1 - r), group=group, stream=stream)
    return mx.add(flat.part(r), gathered[(1 - r) * flat.cols:(2 - r) * flat.cols], stream=stream)


def _pieces(lo: int, hi: int, itemsize: int) -> list[tuple[int, int]]:
    count = max(1, min(MAX_PIECES, math.ceil((hi - lo) * itemsize / PIECE_BYTES)))
    step = math.ceil((hi - lo) / count)
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def _streams() -> list[tuple[mx.Stream, mx.Stream]]:
    """(send, receive) CPU streams for each direction, made once per process on first use."""
    if _state["streams"] is None:
        _state["streams"] = [(mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)) for _ in range(2)]
    return _state["streams"]


def _ring_both_ways(flat: _Flat, n: int, r: int, group) -> mx.array:
    cols = flat.cols
    half = cols // 2 if cols * flat.dtype.size >= BOTH_WAYS_MIN_BYTES else 0
    spans = [(0, cols - half), (cols - half, cols)] if half else [(0, cols)]
    parts, last_sends = [], []
    for direction, ((lo, hi), (send_s, recv_s)) in enumerate(zip(spans, _streams())):
        way = 1 if direction == 0 else -1  # 1: clockwise (send to rank+1), -1: counter-clockwise
        pieces = _pieces(lo, hi, flat.dtype.size) if half else [(lo, hi)]
        result, send_tok = _ring_steps(flat, n, r, group, way, pieces, send_s, recv_s)
        parts.extend(result)
        last_sends.append(send_tok)
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    return mx.depends(out, last_sends)  # the last sends are nobody's input: without this they never run


def _ring_steps(flat: _Flat, n: int, r: int, group, way: int, pieces: list[tuple[int, int]],
                send_s: mx.Stream, recv_s: mx.Stream) -> tuple[list[mx.array], mx.array]:
    """One direction of the ring reduce-scatter over the columns ``pieces``; (result pieces, last send)."""
    dst, src = (r + way) % n, (r - way) % n
    acc = [flat.part((r - way) % n, a, b) for a, b in pieces]  # step 0: the chunk the next rank finishes last
    send_tok = None
    recv_tok = mx.negative(flat.x[:1], stream=recv_s)  # no receive starts before x is there (see _evaluated)
    for s in range(n - 1):
        chunk = (r - way * (s + 2)) % n  # the chunk whose partial sum arrives at step s
        for p, (a, b) in enumerate(pieces):
            data = acc[p]
            if send_tok is not None:  # on the send stream, after the previous send
                data = mx.depends([send_tok, data], [send_tok])[1]
            send_tok = mx.distributed.send(data, dst, group=group, stream=send_s)
            got = mx.distributed.recv((b - a,), flat.dtype, src, group=group, stream=recv_s)
            got = mx.depends(got, [recv_tok])  # received after the previous piece was added (module doc)
            recv_tok = acc[p] = mx.add(got, flat.part(chunk, a, b), stream=recv_s)
    return acc, send_tok


def _ring_one_stream(flat: _Flat, n: int, r: int, group, stream) -> mx.array:
    """The ring reduce-scatter (clockwise) with every send and receive on one stream, even ranks sending
    first: for MPI, whose calls must not overlap."""
    dst, src = (r + 1) % n, (r - 1) % n
    acc = flat.part((r - 1) % n)
    tok = flat.x  # no receive starts before x is there
    for s in range(n - 1):
        chunk = (r - s - 2) % n
        for op in (("send", "recv") if r % 2 == 0 else ("recv", "send")):
            if op == "send":
                data = mx.depends(acc, [tok])
                tok = mx.distributed.send(data, dst, group=group, stream=stream)
            else:
                got = mx.distributed.recv(acc.shape, flat.dtype, src, group=group, stream=stream)
                tok = mx.depends(got, [tok])
                received = tok
        acc = mx.add(received, flat.part(chunk), stream=stream)
    return mx.depends(acc, [tok])


def _lacks_native(group, backend: str) -> bool:
    """Whether ``group``'s backend has no sum_scatter: by name, else by one tiny call.

    The call is safe to make on any backend: where the op exists every rank runs it (they all
    call ``install`` right after init), and where it does not each rank raises before sending.
    """
    if backend in LACKING:
        return True
    if backend in NATIVE or _native is None:
        return False
    try:
        mx.eval(_native(mx.zeros((group.size(),)), group=group))
        return False
    except RuntimeError:
        return True


def _say_once(group) -> None:
    """Rank 0's one line, at the first use (not at install: most programs never reduce-scatter)."""
    if _state["said"] or group.rank() != 0:
        return
    _state["said"] = True
    backend = _state["backend"] if _state["backend"] not in (None, "unknown") else \
        (os.environ.get(protocol.ENV_BACKEND) or "this")
    print(f"orch: sum_scatter: using orch's ring reduce-scatter (the {backend} backend has none)",
          file=sys.stderr, flush=True)


def install(group) -> bool:
    """Make ``mx.distributed.sum_scatter`` this module's where ``group``'s backend lacks one; True if it did.

    Rank 0 says so in one line when it is first used. ``ORCH_SUM_SCATTER=off`` leaves MLX's op (and its
    error) alone.
    """
    if group.size() < 2 or mx.distributed.sum_scatter is sum_scatter:
        return mx.distributed.sum_scatter is sum_scatter
    if os.environ.get(protocol.ENV_SUM_SCATTER, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    backend = (os.environ.get(protocol.ENV_BACKEND) or "").strip().lower()
    if not _lacks_native(group, backend):
        return False
    _state["backend"] = backend or "unknown"
    mx.distributed.sum_scatter = sum_scatter
    return True
