"""The transport-free core: image bytes in, top-k predictions out, through one batched engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from service.batcher import Batcher
from service.engine import Engine, ModelInfo
from service.errors import (
    DeadlineExceeded,
    ImageTooLarge,
    InvalidArgument,
    NotReady,
    Overloaded,
    ServiceError,
)
from service.metrics import Metrics
from service.preprocess import Limits, preprocess
from service.settings import Settings

__all__ = ["Classifier", "ModelInfo", "Prediction"]

MAX_TOP_K = 20


@dataclass(frozen=True, slots=True)
class Prediction:
    index: int  # ImageNet-1k class index (torchvision order)
    label: str
    score: float  # softmax probability


class Classifier:
    """Admits, decodes (in a bounded pool), batches and answers classification requests.

    Lifecycle: start() warms the engine up, then accepts work and reports ready.
    begin_drain() (SIGTERM) only withdraws readiness: requests the transports already received
    still complete while load balancers catch up. drain() stops accepting, answers every
    admitted request, then stops the batcher.
    """

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.info: ModelInfo = engine.info
        self.limits = Limits(settings.max_image_bytes, settings.max_image_pixels)
        self._settings = settings
        self._metrics = metrics
        self._draft = settings.jpeg_draft
        # Admission bound: everything admitted but not answered (decoding, queued, computing).
        self._capacity = settings.max_queue + settings.max_batch_size
        self._admitted = 0
        self._decoding = 0  # admitted images not yet handed to the batcher
        self._idle = asyncio.Event()
        self._idle.set()
        self._ready = False
        self._accepting = False
        self._decode_pool = ThreadPoolExecutor(
            settings.decode_workers, thread_name_prefix="mnv3-decode"
        )
        self._batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_delay=settings.max_batch_delay_ms / 1000,
            max_queue=self._capacity,
            observer=metrics,
            on_the_way=lambda: self._decoding,
        )
        metrics.model_info.info(
            {"arch": self.info.arch, "weights": self.info.weights, "version": self.info.version}
        )

    @property
    def ready(self) -> bool:
        """Readiness: True after warm-up, False again from the first sign of shutdown."""
        return self._ready

    async def start(self) -> None:
        """Warm up every batch size (off the event loop), start batching, become ready."""
        await asyncio.to_thread(self.engine.warm_up, self._settings.max_batch_size)
        await self._batcher.start()
        self._accepting = self._ready = True

    def begin_drain(self) -> None:
        """Withdraw readiness (health checks fail); work keeps being accepted until drain()."""
        self._ready = False

    async def drain(self) -> None:
        """Refuse new requests, finish every admitted one, stop the batcher and decode pool."""
        self._ready = self._accepting = False
        await self._idle.wait()
        await self._batcher.drain()
        self._decode_pool.shutdown(wait=True)

    async def classify(
        self, image: bytes, *, top_k: int = 5, deadline: float | None = None
    ) -> list[Prediction]:
        """Top-k predictions for one image; raises a ServiceError subclass for every refusal."""
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        # Cheap refusals first: nothing is decoded for a request that cannot be served.
        if len(image) > self.limits.max_image_bytes:
            raise ImageTooLarge(
                f"image is {len(image)} bytes; the limit is {self.limits.max_image_bytes}"
            )
        self.check_admission()
        self._admitted += 1
        self._idle.clear()
        try:
            return await self._classify(image, top_k, deadline)
        finally:
            self._admitted -= 1
            if self._admitted == 0:
                self._idle.set()

    def check_admission(self) -> None:
        """Raise NotReady or Overloaded if a request arriving now would be refused.

        Adapters call it before reading a request body, so a shed request costs no upload,
        no buffer and no decode; classify() checks again when it admits the image.
        """
        if not self._accepting:
            self._metrics.on_reject("not_ready")
            raise NotReady("the model is not ready (warming up or shutting down)")
        if self._admitted >= self._capacity:
            self._metrics.on_reject("queue_full")
            raise Overloaded(f"server busy: {self._admitted} images in progress; retry shortly")

    async def classify_batch(
        self, images: Sequence[bytes], *, top_k: int = 5, deadline: float | None = None
    ) -> list[list[Prediction] | ServiceError]:
        """One result per image: its predictions, or the error that refused it alone."""

        async def one(image: bytes) -> list[Prediction] | ServiceError:
            try:
                return await self.classify(image, top_k=top_k, deadline=deadline)
            except ServiceError as exc:
                return exc

        return list(await asyncio.gather(*(one(image) for image in images)))

    async def _classify(self, image: bytes, top_k: int, deadline: float | None) -> list[Prediction]:
        if deadline is not None and time.monotonic() >= deadline:
            self._metrics.on_reject("deadline")
            raise DeadlineExceeded("the deadline passed before the image was decoded")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        decode = partial(preprocess, image, self.engine.spec, self.limits, draft=self._draft)
        self._decoding += 1
        try:
            tensor = await loop.run_in_executor(self._decode_pool, decode)
        finally:  # failed decodes cost time too
            self._decoding -= 1
            self._metrics.preprocess_duration.observe(time.perf_counter() - started)
        probabilities = await self._batcher.submit(tensor, deadline)
        return self._top_k(probabilities, top_k)

    def _run_batch(self, tensors: Sequence[np.ndarray]) -> list[np.ndarray]:
        """On the inference thread: one ORT call, then softmax per row (vectorised, off-loop)."""
        logits = self.engine.run(np.stack(tensors))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return list(shifted / shifted.sum(axis=1, keepdims=True))

    def _top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        top = np.argpartition(probabilities, -k)[-k:]
        top = top[np.argsort(-probabilities[top], kind="stable")]
        labels = self.engine.labels
        return [Prediction(int(i), labels[i], float(probabilities[i])) for i in top]
