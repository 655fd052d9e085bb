"""In-process reference points: the decode + ONNX Runtime ceiling, and single-image latency."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from service.engine import Engine
from service.preprocess import Limits, preprocess

LIMITS = Limits(max_image_bytes=64 << 20, max_image_pixels=100_000_000)


def ceiling(
    model: Path,
    bodies: Sequence[bytes],
    *,
    seconds: float,
    batch_size: int = 8,
    intra_threads: int = 2,
    decode_threads: int = 2,
    draft: bool = True,
) -> float:
    """Images/s of the bare pipeline: a decode pool feeding batches to one ORT session.

    No HTTP, no asyncio, no batcher: what the hardware does at best with the same code.
    """
    engine = Engine(model, intra_op_threads=intra_threads)
    engine.warm_up(batch_size)
    decode = partial(preprocess, spec=engine.spec, limits=LIMITS, draft=draft)
    done = submitted = 0
    pending: deque[Future[np.ndarray]] = deque()
    with ThreadPoolExecutor(decode_threads) as pool:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            # Keep two batches decoding ahead, so the decode threads never wait for inference.
            while len(pending) < 3 * batch_size:
                pending.append(pool.submit(decode, bodies[submitted % len(bodies)]))
                submitted += 1
            batch = [pending.popleft().result() for _ in range(batch_size)]
            engine.run(np.stack(batch))
            done += batch_size
        elapsed = time.perf_counter() - started
        for future in pending:
            future.cancel()
    return done / elapsed


def single_image_ms(
    model: Path,
    bodies: Sequence[bytes],
    *,
    repeats: int = 50,
    intra_threads: int = 2,
    draft: bool = True,
) -> float:
    """Median ms to decode one image and run it alone (batch 1): the floor of REST p50."""
    engine = Engine(model, intra_op_threads=intra_threads)
    engine.warm_up(1)
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        tensor = preprocess(bodies[i % len(bodies)], engine.spec, LIMITS, draft=draft)
        engine.run(tensor[None])
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000
