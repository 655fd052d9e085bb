"""The batcher's contract (DESIGN.md principle 1), driven by a fake model that can be held."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from service.batcher import Batcher
from service.errors import DeadlineExceeded, NotReady, Overloaded

TIMEOUT = 2.0  # upper bound for anything that should happen "now"; never the thing asserted
SLACK = 0.1  # scheduling latency allowed where a test asserts "promptly"
pytestmark = pytest.mark.timeout(10)  # a batcher bug tends to hang a caller: fail, don't hang


class FakeModel:
    """A run_batch that answers item * 10, records every batch and can be held mid-compute."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: list[threading.Thread] = []
        self.started_at: list[float] = []
        self.fail_with: Exception | None = None
        self.short_by = 0  # return this many results too few
        self.released = threading.Event()
        self.released.set()
        self._loop = asyncio.get_running_loop()
        self._started: asyncio.Queue[list[int]] = asyncio.Queue()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.started_at.append(time.monotonic())
        self.batches.append(list(items))
        self.threads.append(threading.current_thread())
        self._loop.call_soon_threadsafe(self._started.put_nowait, list(items))
        assert self.released.wait(TIMEOUT)
        if self.fail_with is not None:
            raise self.fail_with
        return [item * 10 for item in items][: len(items) - self.short_by]

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    async def started(self) -> list[int]:
        """Wait until the next batch is inside run_batch; return its items."""
        async with asyncio.timeout(TIMEOUT):
            return await self._started.get()


class FakeObserver:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.rejects: list[str] = []
        self.batches: list[tuple[int, list[float], float]] = []

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)

    def on_batch(self, size: int, queue_waits: Sequence[float], seconds: float) -> None:
        self.batches.append((size, list(queue_waits), seconds))


@pytest.fixture(autouse=True)
async def no_loop_errors() -> AsyncIterator[None]:
    """Fail any test that leaves asyncio noise ("Future exception was never retrieved", ...)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    gc.collect()  # unretrieved future exceptions are reported when the future is collected
    loop.set_exception_handler(None)
    assert errors == []


@pytest.fixture
async def model() -> FakeModel:
    return FakeModel()  # async, so that it binds to the test's event loop


def make(
    model: FakeModel,
    *,
    max_batch_size: int = 8,
    max_delay: float = 0.01,
    max_queue: int = 100,
    observer: FakeObserver | None = None,
    on_the_way: Callable[[], int] | None = None,
) -> Batcher[int, int]:
    return Batcher(
        model,
        max_batch_size=max_batch_size,
        max_delay=max_delay,
        max_queue=max_queue,
        on_the_way=on_the_way,
        observer=observer,
    )


@asynccontextmanager
async def running(batcher: Batcher[int, int]) -> AsyncIterator[Batcher[int, int]]:
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.drain()


async def submit_all(batcher: Batcher[int, int], items: Iterable[int]) -> list[int | BaseException]:
    """Submit concurrently; each caller's result or exception, in order."""
    return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)


async def settle() -> None:
    """Let every task that is ready run up to its next await (no time passes)."""
    await asyncio.sleep(0)


async def test_batches_are_capped_at_max_batch_size(model: FakeModel) -> None:
    async with running(make(model, max_batch_size=8)) as batcher:
        # gather enqueues all 20 in one tick, before the collector looks at the queue.
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert results == [i * 10 for i in range(20)]
    assert model.batches == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]


async def test_a_lone_item_waits_max_delay_then_goes_alone(model: FakeModel) -> None:
    observer = FakeObserver()
    async with running(make(model, max_delay=0.2, observer=observer)) as batcher:
        submitted = time.monotonic()
        assert await batcher.submit(7) == 70
    assert model.batches == [[7]]
    assert 0.2 <= model.started_at[0] - submitted < 0.2 + SLACK
    [(size, [wait], _)] = observer.batches
    assert size == 1
    assert wait >= 0.2


async def test_a_lone_item_leaves_at_once_when_nothing_is_on_its_way(model: FakeModel) -> None:
    on_the_way = 0
    async with running(make(model, max_delay=0.2, on_the_way=lambda: on_the_way)) as batcher:
        submitted = time.monotonic()
        assert await batcher.submit(7) == 70
        assert model.started_at[0] - submitted < SLACK  # no company coming: no waiting
        on_the_way = 1  # another item is being prepared: worth waiting for
        submitted = time.monotonic()
        assert await batcher.submit(8) == 80
        assert 0.2 <= model.started_at[1] - submitted < 0.2 + SLACK
    assert model.batches == [[7], [8]]


async def test_next_batch_fills_while_one_computes_and_leaves_at_once(model: FakeModel) -> None:
    async with running(make(model, max_delay=0.2)) as batcher:
        model.hold()
        first = asyncio.create_task(batcher.submit(1))
        assert await model.started() == [1]
        rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
        await settle()
        assert batcher.depth == 3  # queued behind the computing batch, not computed alongside
        await asyncio.sleep(0.25)  # setup: the queued items have now waited > max_delay
        released = time.monotonic()
        model.release()
        assert await model.started() == [2, 3, 4]
        # They had already waited max_delay, so they did not wait another one.
        assert model.started_at[1] - released < SLACK
        assert await first == 10
        assert await asyncio.gather(*rest) == [20, 30, 40]
    assert model.batches == [[1], [2, 3, 4]]


async def test_run_batch_error_reaches_every_caller_and_batcher_survives(model: FakeModel) -> None:
    boom = ValueError("boom")
    async with running(make(model)) as batcher:
        model.fail_with = boom
        outcomes = await submit_all(batcher, range(3))
        assert outcomes == [boom, boom, boom]
        model.fail_with = None
        assert await batcher.submit(5) == 50
    assert model.batches == [[0, 1, 2], [5]]


async def test_wrong_number_of_results_fails_every_caller(model: FakeModel) -> None:
    async with running(make(model)) as batcher:
        model.short_by = 1
        outcomes = await submit_all(batcher, range(3))
        assert [str(o) for o in outcomes] == ["run_batch returned 2 results for 3 items"] * 3
        assert all(type(o) is RuntimeError for o in outcomes)
        model.short_by = 0
        assert await batcher.submit(5) == 50


async def test_cancelled_caller_is_skipped_and_frees_its_slot(model: FakeModel) -> None:
    async with running(make(model, max_queue=2)) as batcher:
        model.hold()
        first = asyncio.create_task(batcher.submit(1))
        await model.started()
        doomed = asyncio.create_task(batcher.submit(2))
        kept = asyncio.create_task(batcher.submit(3))
        await settle()
        with pytest.raises(Overloaded):
            await batcher.submit(4)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.depth == 1
        late = asyncio.create_task(batcher.submit(5))  # takes the freed slot
        await settle()
        model.release()
        assert [await first, await kept, await late] == [10, 30, 50]
    assert model.batches == [[1], [3, 5]]  # 2 was never computed


async def test_caller_cancelled_just_before_its_batch_forms_is_skipped(model: FakeModel) -> None:
    # on_batch runs in the collector, which then forms the next batch without yielding: the
    # cancelled caller's item is still queued (its task has not run yet) and must be skipped.
    class CancelOnBatch(FakeObserver):
        def on_batch(self, size: int, queue_waits: Sequence[float], seconds: float) -> None:
            doomed.cancel()

    async with running(make(model, max_delay=0, observer=CancelOnBatch())) as batcher:
        model.hold()
        first = asyncio.create_task(batcher.submit(1))
        await model.started()
        doomed = asyncio.create_task(batcher.submit(2))
        kept = asyncio.create_task(batcher.submit(3))
        await settle()
        model.release()
        assert [await first, await kept] == [10, 30]
        with pytest.raises(asyncio.CancelledError):
            await doomed
    assert model.batches == [[1], [3]]


async def test_caller_cancelled_mid_compute_just_misses_its_result(model: FakeModel) -> None:
    async with running(make(model)) as batcher:
        model.hold()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        assert await model.started() == [1, 2]
        tasks[0].cancel()
        model.release()
        assert await tasks[1] == 20
        assert tasks[0].cancelled()


async def test_caller_cancelled_after_its_batch_failed_leaves_no_noise(model: FakeModel) -> None:
    # The observer runs right after the futures are resolved, before the callers resume:
    # cancelling there means nobody ever reads the error (the autouse fixture checks no log).
    class CancelOnBatch(FakeObserver):
        def on_batch(self, size: int, queue_waits: Sequence[float], seconds: float) -> None:
            victim.cancel()

    model.fail_with = ValueError("boom")
    async with running(make(model, observer=CancelOnBatch())) as batcher:
        victim = asyncio.create_task(batcher.submit(1))
        with pytest.raises(asyncio.CancelledError):
            await victim


async def test_full_queue_rejects_at_once(model: FakeModel) -> None:
    observer = FakeObserver()
    async with running(make(model, max_queue=2, observer=observer)) as batcher:
        model.hold()
        first = asyncio.create_task(batcher.submit(1))
        await model.started()
        queued = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
        await settle()
        assert batcher.depth == 2
        yielded: list[bool] = []
        asyncio.get_running_loop().call_soon(yielded.append, True)
        with pytest.raises(Overloaded):
            await batcher.submit(4)
        assert yielded == []  # it raised without yielding to the event loop even once
        assert observer.rejects == ["queue_full"]
        model.release()
        assert [await first, *await asyncio.gather(*queued)] == [10, 20, 30]


async def test_expired_item_is_dropped_before_compute(model: FakeModel) -> None:
    observer = FakeObserver()
    async with running(make(model, observer=observer)) as batcher:
        past = time.monotonic() - 1
        future = time.monotonic() + 60
        outcomes = await asyncio.gather(
            batcher.submit(1, deadline=past),
            batcher.submit(2, deadline=future),
            batcher.submit(3),
            return_exceptions=True,
        )
    assert isinstance(outcomes[0], DeadlineExceeded)
    assert list(outcomes[1:]) == [20, 30]
    assert model.batches == [[2, 3]]
    assert observer.rejects == ["deadline"]
    assert [size for size, _, _ in observer.batches] == [2]


async def test_drain_finishes_queued_and_inflight_work_then_refuses(model: FakeModel) -> None:
    observer = FakeObserver()
    # max_delay is far beyond the test timeout: draining must not wait for a batch to fill.
    batcher = make(model, max_batch_size=2, max_delay=60, observer=observer)
    await batcher.start()
    model.hold()
    inflight = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    assert await model.started() == [1, 2]
    queued = asyncio.create_task(batcher.submit(3))
    await settle()
    draining = asyncio.create_task(batcher.drain())
    await settle()
    with pytest.raises(NotReady):
        await batcher.submit(4)
    assert not draining.done()
    model.release()
    async with asyncio.timeout(TIMEOUT):
        await draining
    assert [await inflight[0], await inflight[1], await queued] == [10, 20, 30]
    assert model.batches == [[1, 2], [3]]
    assert not model.threads[0].is_alive()  # the inference thread was shut down
    await batcher.drain()  # idempotent
    with pytest.raises(NotReady):
        await batcher.submit(5)
    assert observer.rejects == ["not_ready", "not_ready"]


async def test_cancelled_drain_abandons_remaining_work_without_blocking(model: FakeModel) -> None:
    batcher = make(model, max_batch_size=1)
    await batcher.start()
    model.hold()
    inflight = asyncio.create_task(batcher.submit(1))
    await model.started()
    queued = asyncio.create_task(batcher.submit(2))
    await settle()
    draining = asyncio.create_task(batcher.drain())
    await settle()
    draining.cancel()  # e.g. the shutdown grace period ran out
    with pytest.raises(asyncio.CancelledError):
        await draining
    assert model.threads[0].is_alive()  # run_batch is still held: drain did not wait for it
    for caller in (inflight, queued):
        with pytest.raises(NotReady):
            await caller
    model.release()
    await asyncio.to_thread(model.threads[0].join, TIMEOUT)
    assert model.batches == [[1]]


async def test_submit_before_start_is_not_ready(model: FakeModel) -> None:
    observer = FakeObserver()
    batcher = make(model, observer=observer)
    with pytest.raises(NotReady):
        await batcher.submit(1)
    assert observer.rejects == ["not_ready"]
    await batcher.drain()  # draining a batcher that never started is harmless
    with pytest.raises(RuntimeError):
        await batcher.start()  # and it cannot start afterwards


async def test_observer_sees_depth_changes_and_every_batch(model: FakeModel) -> None:
    observer = FakeObserver()
    async with running(make(model, max_batch_size=2, observer=observer)) as batcher:
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))
    # Three enqueued in one tick, a full batch of 2 taken, then the last one taken.
    assert observer.depths == [1, 2, 3, 1, 0]
    assert [(size, len(waits)) for size, waits, _ in observer.batches] == [(2, 2), (1, 1)]
    for _, waits, seconds in observer.batches:
        assert all(w >= 0 for w in waits)
        assert seconds >= 0
    assert observer.rejects == []


async def test_inference_runs_on_the_dedicated_thread(model: FakeModel) -> None:
    async with running(make(model)) as batcher:
        await batcher.submit(1)
        await batcher.submit(2)
    first, second = model.threads
    assert first is second  # one thread, so one batch computes at a time
    assert first.name.startswith("mnv3-infer")
    assert first is not threading.current_thread()  # not the event loop's thread
