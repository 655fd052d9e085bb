"""The one place requests are batched: a bounded queue of opaque items, one inference thread."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from service.errors import DeadlineExceeded, NotReady, Overloaded

In = TypeVar("In")
Out = TypeVar("Out")


class BatchObserver(Protocol):
    """What the batcher reports (service.metrics.Metrics implements it)."""

    def on_queue_depth(self, depth: int) -> None: ...
    def on_reject(self, reason: str) -> None: ...  # "queue_full", "deadline", "not_ready"
    def on_batch(self, size: int, queue_waits: Sequence[float], seconds: float) -> None: ...


class _NoObserver:
    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_reject(self, reason: str) -> None:
        pass

    def on_batch(self, size: int, queue_waits: Sequence[float], seconds: float) -> None:
        pass


# eq=False: deque.remove() must find this very request, not an equal-looking one.
@dataclass(eq=False, slots=True)
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]  # the caller awaits it; the collector resolves it
    enqueued: float  # time.monotonic()
    deadline: float | None


class Batcher(Generic[In, Out]):
    """Groups submitted items into batches and runs `run_batch` on them on one dedicated thread.

    A batch closes when it holds `max_batch_size` items or its oldest item has waited
    `max_delay` seconds. Only one batch computes at a time; the next one fills meanwhile.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_delay: float,
        max_queue: int,
        observer: BatchObserver | None = None,
        on_the_way: Callable[[], int] | None = None,
    ) -> None:
        """`on_the_way`, if given, counts items the caller is still preparing (e.g. decoding):
        a batch stops waiting for company as soon as none is on its way, so a lone request
        does not pay max_delay for nothing."""
        if max_batch_size < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1 and max_delay >= 0")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_delay = max_delay
        self._max_queue = max_queue
        self._observer: BatchObserver = observer if observer is not None else _NoObserver()
        self._on_the_way = on_the_way
        self._queue: deque[_Pending[In, Out]] = deque()
        self._wakeup = asyncio.Event()  # set on every enqueue and on drain
        self._accepting = False
        self._closed = False
        self._reported_depth = 0
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not yet part of a computing batch)."""
        return len(self._queue)

    async def start(self) -> None:
        if self._closed or self._collector is not None:
            raise RuntimeError("a Batcher is started once")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mnv3-infer")
        self._executor.submit(lambda: None)  # spawns the thread now, not on the first request
        self._collector = asyncio.create_task(self._collect(), name="mnv3-batcher")
        self._accepting = True

    async def submit(self, item: In, deadline: float | None = None) -> Out:
        """Queue `item` and return its result; `deadline` is absolute time.monotonic() seconds."""
        if not self._accepting:
            self._observer.on_reject("not_ready")
            raise NotReady("the batcher is not running (not started yet, or draining)")
        if len(self._queue) >= self._max_queue:
            # Shed load now: waiting for a slot would only make every queued request later.
            self._observer.on_reject("queue_full")
            raise Overloaded(f"the batch queue is full ({self._max_queue} waiting)")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, time.monotonic(), deadline)
        self._queue.append(pending)
        self._report_depth()
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up: free its slot so its item is never computed.
            with contextlib.suppress(ValueError):  # already taken into a batch
                self._queue.remove(pending)
                self._report_depth()
            raise

    async def drain(self) -> None:
        """Refuse new items, finish every accepted one, then stop the thread. Idempotent.

        Cancelling drain (a shutdown grace period running out) abandons the remaining work:
        its callers get NotReady.
        """
        self._accepting = False
        self._closed = True
        self._wakeup.set()
        if self._collector is None or self._executor is None:
            return
        try:
            await self._collector
        finally:
            # After a normal return the thread is idle and this join is instant; after a
            # cancellation it may still be computing, and the event loop must not wait for it.
            self._executor.shutdown(wait=not self._collector.cancelled())

    async def _collect(self) -> None:
        try:
            while True:
                await self._batch_closes()
                if batch := self._take_batch():
                    await self._run(batch)
                elif not self._accepting and not self._queue:
                    return
        finally:
            # Normally the queue is empty here; after a bug or cancellation nobody may hang.
            self._accepting = False
            self._fail(self._queue, NotReady("the batcher stopped"))
            self._queue.clear()
            self._report_depth()

    async def _batch_closes(self) -> None:
        """Wait until a full batch is queued, the oldest item has waited max_delay, or draining."""
        while len(self._queue) < self._max_batch_size and self._accepting:
            timeout = None
            if self._queue:
                # From the item's enqueue time: if it already waited while the previous
                # batch computed, it leaves at once with whatever is queued.
                timeout = self._queue[0].enqueued + self._max_delay - time.monotonic()
                if timeout <= 0 or (self._on_the_way is not None and self._on_the_way() == 0):
                    return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):  # loop to re-check; timers may fire early
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    def _take_batch(self) -> list[_Pending[In, Out]]:
        """Pop up to max_batch_size live items; expired ones fail now, cancelled ones vanish."""
        now = time.monotonic()
        batch: list[_Pending[In, Out]] = []
        while self._queue and len(batch) < self._max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # its caller was cancelled
                continue
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(DeadlineExceeded("the deadline passed in the queue"))
                self._observer.on_reject("deadline")
                continue
            batch.append(pending)
        self._report_depth()
        return batch

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        assert self._executor is not None
        items = [pending.item for pending in batch]
        started = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            outs = await loop.run_in_executor(self._executor, self._run_batch, items)
            if len(outs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outs)} results for {len(batch)} items")
        except asyncio.CancelledError:
            self._fail(batch, NotReady("the batcher stopped while this batch computed"))
            raise
        except Exception as exc:  # one failure answers every caller of the batch
            self._fail(batch, exc)
        else:
            for pending, out in zip(batch, outs, strict=True):
                if not pending.future.done():  # a cancelled caller just misses its result
                    pending.future.set_result(out)
        waits = [started - pending.enqueued for pending in batch]
        self._observer.on_batch(len(batch), waits, time.monotonic() - started)

    @staticmethod
    def _fail(batch: Iterable[_Pending[In, Out]], exc: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    def _report_depth(self) -> None:
        if len(self._queue) != self._reported_depth:
            self._reported_depth = len(self._queue)
            self._observer.on_queue_depth(self._reported_depth)
