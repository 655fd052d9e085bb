"""The application: builds REST, gRPC and the core; owns start-up and shutdown (the lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict

from fastapi import FastAPI

from service.classifier import Classifier
from service.engine import Engine
from service.grpc_api import GrpcServer
from service.metrics import Metrics
from service.rest import Admission, RequestMetrics, install_error_handlers, router
from service.settings import Settings

logger = logging.getLogger(__name__)


def load_engine(settings: Settings) -> Engine:
    """The ONNX Runtime session for settings.model_path (raises ModelLoadError)."""
    return Engine(settings.model_path, intra_op_threads=settings.intra_threads)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app; its lifespan also runs the gRPC server on the same event loop.

    Start-up: load the engine (unless given), start gRPC (health NOT_SERVING), then warm up in
    the background so /healthz answers at once and /readyz turns 200 when warm. Shutdown (also
    begun early by the SIGTERM hook, app.state.begin_drain): not ready -> stop gRPC with grace
    -> drain the core (every admitted request is answered) -> done.
    """
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine if engine is not None else await asyncio.to_thread(load_engine, settings)
        classifier = Classifier(eng, settings, metrics)
        grpc_server = GrpcServer(
            classifier,
            metrics,
            host=settings.http_host,
            port=settings.grpc_port,
            max_image_bytes=settings.max_image_bytes,
            max_batch_images=settings.max_batch_images,
            default_timeout=settings.request_timeout_ms / 1000,
            max_concurrent_rpcs=settings.transport_limit,
        )
        app.state.grpc_port = await grpc_server.start()
        app.state.classifier = classifier
        app.state.model_json = asdict(classifier.info)

        def begin_drain() -> None:
            classifier.begin_drain()
            grpc_server.set_serving(False)

        async def warm_up() -> None:
            await classifier.start()
            # Everything allocated so far (modules, the session, labels) lives for the whole
            # process: keep it out of the garbage collector's full passes, which pause the loop.
            gc.freeze()
            grpc_server.set_serving(True)
            logger.info(
                "ready: %s (%s weights, version %s), batches up to %d",
                classifier.info.name,
                classifier.info.weights,
                classifier.info.version,
                settings.max_batch_size,
            )

        app.state.begin_drain = begin_drain
        warming = asyncio.create_task(warm_up(), name="mnv3-warm-up")
        try:
            yield
        finally:
            logger.info("shutting down: draining in-flight requests")
            begin_drain()
            if not warming.done():
                warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await grpc_server.stop(settings.shutdown_grace_s)
            await classifier.drain()
            logger.info("shutdown complete")

    app = FastAPI(
        title="mnv3-serve",
        version="0.1.0",
        summary="MobileNetV3 image classification: REST + gRPC, dynamically batched.",
        lifespan=lifespan,
    )
    app.include_router(router(settings, metrics))
    install_error_handlers(app)
    # The last added runs first: every API request is counted, then refused if need be.
    app.add_middleware(Admission)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.state.metrics = metrics
    app.state.settings = settings
    return app
