"""A small task group: structured concurrency on Python 3.10 too.

``asyncio.TaskGroup`` arrived in Python 3.11 and the controller runs on users'
Macs, where 3.10 is still common (``requires-python >= 3.10``). This is the
part of it the supervisor needs, with one addition: :meth:`TaskGroup.drain`,
a bounded wait after which what is still running is cancelled (an output
pump whose pipe a daemon the rank left behind holds open never sees its end
of file; the run must end anyway).

Semantics, as asyncio's: the first task to fail cancels every other task of
the group and the task that opened it; leaving the ``async with`` waits for
every task; that first error is then raised (a plain exception, not an
ExceptionGroup, so callers read the same on every Python version).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any, Callable, Coroutine, Iterator, Optional


class TaskGroup:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._error: Optional[BaseException] = None
        self._parent: Optional[asyncio.Task] = None
        self._parent_cancelled = False

    async def __aenter__(self) -> "TaskGroup":
        self._parent = asyncio.current_task()
        return self

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        if self._error is None:
            self._error = task.exception()
            self.cancel()
            if self._parent is not None and not self._parent.done():
                self._parent_cancelled = True
                self._parent.cancel()

    def cancel(self) -> None:
        for t in self._tasks:
            if not t.done():
                t.cancel()

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for every task, then cancel the rest and wait for them to go."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.cancel()
        outside: Optional[BaseException] = None
        while True:  # every task has ended before this returns, even when this task is cancelled meanwhile
            try:
                await asyncio.gather(*self._tasks, return_exceptions=True)
                break
            except asyncio.CancelledError as e:
                self.cancel()
                outside = outside or e
        if self._error is not None:
            if self._parent_cancelled and self._parent is not None and hasattr(self._parent, "uncancel"):
                self._parent.uncancel()  # the cancel was ours: the error is what the caller sees
            if exc_type is None or issubclass(exc_type, asyncio.CancelledError):
                raise self._error
            return False
        if outside is not None:
            raise outside
        return False


def handled_cancellation() -> None:
    """A ``CancelledError`` the current task caught and handled (Ctrl-C as asyncio.run delivers it) is not
    pending any more: a later ``asyncio.timeout`` must not take it for its own (Python 3.11+; 3.10 keeps no
    count)."""
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


@contextlib.contextmanager
def signals_handled_by(handler: Callable[[int], Any], sigs: tuple = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """SIGINT/SIGTERM go to ``handler(sig)`` on the running loop for the ``with`` body; then back to what was there.

    ``loop.remove_signal_handler`` alone resets a signal to Python's default, which drops whatever was
    installed before: ``asyncio.run``'s own SIGINT handler (a Ctrl-C in a later attempt's connecting or
    staging then was a bare ``KeyboardInterrupt`` in the loop), or a test runner's SIGTERM handler.
    """
    loop = asyncio.get_running_loop()
    before = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
            if before[sig] is not None:
                signal.signal(sig, before[sig])
