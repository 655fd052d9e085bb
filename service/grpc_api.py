"""The gRPC front end: mnv3.v1.Classifier, health and reflection on one grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Protocol, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service.errors import (
    BodyTimeout,
    DeadlineExceeded,
    ImageTooLarge,
    InvalidArgument,
    InvalidImage,
    NotReady,
    Overloaded,
    ServiceError,
    UnsupportedMediaType,
)
from service.metrics import Metrics
from service.proto.mnv3.v1 import classifier_pb2 as pb
from service.proto.mnv3.v1 import classifier_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # mnv3.v1.Classifier
DEFAULT_TOP_K: Final = 5  # what top_k = 0 means: proto3 cannot tell "unset" from 0
# Items of one ClassifyStream computed at once: enough to fill several batches, bounded so one
# client cannot queue unlimited work (it also bounds the responses waiting to be written).
STREAM_CONCURRENCY: Final = 32
# A request message may exceed the image by its protobuf framing, an id and top_k: a few bytes.
MESSAGE_MARGIN: Final = 64 * 1024
ERROR_CODE_KEY: Final = "mnv3-error-code"  # trailing metadata: the REST API's error code word

# ServiceError -> gRPC status: the one mapping table of this adapter (DESIGN.md's error table).
# ImageTooLarge is INVALID_ARGUMENT for bytes and pixels alike: retrying cannot help, and
# RESOURCE_EXHAUSTED stays reserved for load shedding, which a client should retry. (gRPC
# itself still answers RESOURCE_EXHAUSTED for a message over max_image_bytes + MESSAGE_MARGIN,
# before it reaches this code.) Anything not listed, including bugs, is INTERNAL.
STATUS_OF: Final[dict[type[ServiceError], grpc.StatusCode]] = {
    InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ImageTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    BodyTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,  # REST's slow body; gRPC never raises it
    NotReady: grpc.StatusCode.UNAVAILABLE,
}


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel arguments of the server, tuned for clients on flaky edge networks."""
    return [
        # gRPC's 4 MiB default would refuse images that REST accepts.
        ("grpc.max_receive_message_length", max_message_bytes),
        # Ping a quiet client every 30 s and drop it if no ack within 10 s: Wi-Fi/LTE links die
        # silently and NAT boxes forget idle flows after ~1 min, so half-open connections (and
        # their streams) are found in under a minute instead of at the TCP timeout (~15 min).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging idle connections
        # Let clients do the same: accept their pings every >= 10 s, even with no call open,
        # instead of answering GOAWAY "too_many_pings" (the default minimum is 5 min).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Close connections without any call for 5 min: a small box should not hold memory
        # for clients that went away; a returning client reconnects transparently.
        ("grpc.max_connection_idle_ms", 300_000),
        # Fail to start if the port is taken, instead of silently sharing it (Linux default).
        ("grpc.so_reuseport", 0),
    ]


class CorePrediction(Protocol):
    """One class and its probability, as service.classifier.Prediction."""

    @property
    def index(self) -> int: ...
    @property
    def label(self) -> str: ...
    @property
    def score(self) -> float: ...


class CoreModelInfo(Protocol):
    """The served model, as service.classifier.ModelInfo."""

    @property
    def name(self) -> str: ...
    @property
    def arch(self) -> str: ...
    @property
    def weights(self) -> str: ...
    @property
    def weights_sha256(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def input_size(self) -> int: ...
    @property
    def num_classes(self) -> int: ...


class Core(Protocol):
    """What this adapter uses of service.classifier.Classifier (the transport-free core)."""

    @property
    def info(self) -> CoreModelInfo: ...

    async def classify(
        self, image: bytes, *, top_k: int = ..., deadline: float | None = None
    ) -> Sequence[CorePrediction]: ...

    async def classify_batch(
        self, images: Sequence[bytes], *, top_k: int = ..., deadline: float | None = None
    ) -> Sequence[Sequence[CorePrediction] | ServiceError]: ...

    def check_admission(self) -> None: ...


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status code, message, reason word) for an error raised by the core, or by a bug."""
    if isinstance(exc, ServiceError):
        for cls in type(exc).__mro__:
            if cls in STATUS_OF:
                return STATUS_OF[cls], exc.message, exc.code
    # The message of an unexpected error may leak internals: log it, send a generic one.
    logger.error("internal error in gRPC handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error", "internal"


def _error(exc: BaseException) -> pb.Error:
    code, message, reason = status_of(exc)
    return pb.Error(code=code.value[0], message=message, reason=reason)


def _predictions(predictions: Sequence[CorePrediction]) -> pb.Predictions:
    return pb.Predictions(predictions=[_prediction(p) for p in predictions])


def _prediction(p: CorePrediction) -> pb.Prediction:
    return pb.Prediction(index=p.index, label=p.label, score=p.score)


def _top_k(requested: int) -> int:
    return requested or DEFAULT_TOP_K


class _Rpc:
    """Around one RPC: counts it in flight, times it, and turns an escaping error into a status.

    The duration is recorded for every outcome, labelled with the status code name.
    """

    def __init__(
        self, metrics: Metrics, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self._metrics, self._method, self._context = metrics, method, context
        self._start = 0.0

    async def __aenter__(self) -> None:
        self._start = time.perf_counter()
        self._metrics.inflight.inc()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Recorded before abort(), which sends the status at once: the client may look next.
        self._metrics.inflight.dec()
        if exc is None:
            self._observe(grpc.StatusCode.OK)
        elif not isinstance(exc, Exception):
            # Cancelled (client gone, deadline hit, server stopping) or a closed stream: let it
            # propagate, that is what unwinds the core's awaits and frees their batch slots.
            # The client's deadline and ours run on two clocks, and the cancel travels: a call
            # cancelled within 50 ms of its deadline was cut by the deadline.
            remaining = self._context.time_remaining()
            expired = remaining is not None and remaining <= 0.05
            self._observe(
                grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            )
        else:
            code, message, reason = status_of(exc)
            self._observe(code)
            await self._context.abort(code, message, trailing_metadata=((ERROR_CODE_KEY, reason),))

    def _observe(self, code: grpc.StatusCode) -> None:
        self._metrics.request_duration.labels(
            protocol="grpc", method=self._method, code=code.name
        ).observe(time.perf_counter() - self._start)


# Type names only (grpc's classes are generic in its stubs, not at run time).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# What an interceptor calls for the handler the server would use (None: no such method).
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


class Admission(grpc.aio.ServerInterceptor):
    """Sheds Classify and ClassifyBatch calls before their request message is read.

    A unary handler only runs once gRPC has received and parsed the whole request (megabytes of
    image); a refused call should cost neither. When the core would refuse, the call is served by
    a request-streaming handler that never reads its stream: the client gets
    RESOURCE_EXHAUSTED (or UNAVAILABLE) at once and the stream is reset, as REST does with 503.
    """

    GATED: Final = frozenset({f"/{SERVICE_NAME}/Classify", f"/{SERVICE_NAME}/ClassifyBatch"})

    def __init__(self, core: Core, metrics: Metrics) -> None:
        self._core, self._metrics = core, metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        if method in self.GATED:
            try:
                self._core.check_admission()
            except ServiceError as exc:
                return grpc.stream_unary_rpc_method_handler(self._refuser(method, exc))
        return await continuation(handler_call_details)

    def _refuser(
        self, method: str, exc: ServiceError
    ) -> Callable[[object, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
        async def refuse(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async with _Rpc(self._metrics, method.rsplit("/", 1)[1], context):
                raise exc  # _Rpc records it and turns it into the status

        return refuse


class _Unparsable:
    """Stands in for a request message that did not parse, so that its handler can refuse it."""

    def __init__(self, method: str, error: Exception) -> None:
        self.error = InvalidArgument(f"the request is not a valid {method} message: {error}")


class StrictParsing(grpc.aio.ServerInterceptor):
    """Answers a request that is not a valid message with INVALID_ARGUMENT.

    grpc parses each message before the handler sees it and answers a failure with UNKNOWN
    ("Unexpected <class DecodeError>"), a server-error code, for what is the client's mistake:
    garbage bytes, or a client built from an incompatible .proto. Here a failed parse becomes a
    marker that the handler turns into the status of DESIGN.md's error table.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._strict: dict[str, Handler] = {}  # per method of our service, built once

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        path = handler_call_details.method
        if (strict := self._strict.get(path)) is not None:
            return strict
        handler = await continuation(handler_call_details)
        if handler is None or not path.startswith(f"/{SERVICE_NAME}/"):
            return handler  # unknown methods are not cached: clients choose their names
        self._strict[path] = strict = self._strict_handler(path.rsplit("/", 1)[1], handler)
        return strict

    def _strict_handler(self, method: str, handler: Handler) -> Handler:
        parse = handler.request_deserializer
        if parse is None:
            return handler
        # grpc's stubs type handlers for the sync server; these behaviours are coroutines.
        unary: Any = handler.unary_unary
        streaming: Any = handler.stream_stream

        def lenient(raw: bytes) -> object:
            try:
                return parse(raw)
            except DecodeError as exc:
                return _Unparsable(method, exc)

        async def checked(requests: AsyncIterator[object]) -> AsyncIterator[object]:
            async for request in requests:
                if isinstance(request, _Unparsable):
                    raise request.error
                yield request

        async def one(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Unparsable):
                async with _Rpc(self._metrics, method, context):
                    raise request.error
            return await unary(request, context)

        async def many(requests: AsyncIterator[object], context: Any) -> AsyncIterator[Any]:
            async for reply in streaming(checked(requests), context):
                yield reply

        reply = handler.response_serializer
        if unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                one, request_deserializer=lenient, response_serializer=reply
            )
        if streaming is not None:
            return grpc.stream_stream_rpc_method_handler(
                many, request_deserializer=lenient, response_serializer=reply
            )
        return handler


class ClassifierService(pb_grpc.ClassifierServicer):
    """mnv3.v1.Classifier: parses requests, calls the core, formats replies. Nothing more."""

    def __init__(
        self,
        core: Core,
        metrics: Metrics,
        *,
        max_batch_images: int | None = None,
        default_timeout: float | None = None,
    ) -> None:
        self._core = core
        self._metrics = metrics
        self._max_batch_images = max_batch_images
        self._default_timeout = default_timeout
        info = core.info
        self._model = pb.ModelInfo(
            name=info.name,
            arch=info.arch,
            weights=info.weights,
            weights_sha256=info.weights_sha256,
            version=info.version,
            input_size=info.input_size,
            num_classes=info.num_classes,
        )

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
        # The core wants an absolute time.monotonic() deadline; gRPC gives seconds left or None,
        # and without one the server's default applies, as for REST.
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self._default_timeout
        return None if remaining is None else time.monotonic() + remaining

    async def Classify(
        self,
        request: pb.ClassifyRequest,
        context: grpc.aio.ServicerContext[pb.ClassifyRequest, pb.ClassifyResponse],
    ) -> pb.ClassifyResponse:
        async with _Rpc(self._metrics, "Classify", context):
            predictions = await self._core.classify(
                request.image, top_k=_top_k(request.top_k), deadline=self._deadline(context)
            )
            return pb.ClassifyResponse(
                model=self._model, predictions=[_prediction(p) for p in predictions]
            )

    async def ClassifyBatch(
        self,
        request: pb.ClassifyBatchRequest,
        context: grpc.aio.ServicerContext[pb.ClassifyBatchRequest, pb.ClassifyBatchResponse],
    ) -> pb.ClassifyBatchResponse:
        async with _Rpc(self._metrics, "ClassifyBatch", context):
            count, limit = len(request.images), self._max_batch_images
            if count == 0:
                raise InvalidArgument("ClassifyBatch needs at least one image")
            if limit is not None and count > limit:
                raise InvalidArgument(f"ClassifyBatch takes at most {limit} images, got {count}")
            outcomes = await self._core.classify_batch(
                list(request.images), top_k=_top_k(request.top_k), deadline=self._deadline(context)
            )
            results = [
                pb.BatchItemResult(error=_error(outcome))
                if isinstance(outcome, ServiceError)
                else pb.BatchItemResult(predictions=_predictions(outcome))
                for outcome in outcomes
            ]
            return pb.ClassifyBatchResponse(model=self._model, results=results)

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[pb.StreamRequest, pb.StreamResponse],
    ) -> AsyncIterator[pb.StreamResponse]:
        async with _Rpc(self._metrics, "ClassifyStream", context):
            # Items run concurrently so that one stream fills batches; a slot is taken when an
            # item is read and given back only once its response has been written, which
            # bounds both the work in flight and the replies waiting for a slow reader.
            slots = asyncio.Semaphore(STREAM_CONCURRENCY)
            done: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()

            async def answer(request: pb.StreamRequest, deadline: float | None) -> None:
                done.put_nowait(await self._stream_item(request, deadline))

            async def read() -> None:
                unreadable: ServiceError | None = None  # an item that did not parse
                try:
                    async with asyncio.TaskGroup() as items:
                        try:
                            async for request in request_iterator:
                                await slots.acquire()
                                # Without a call deadline each item gets the default from the
                                # time it is read: a stream may rightly stay open for hours.
                                items.create_task(answer(request, self._deadline(context)))
                        except ServiceError as exc:  # raised here, not wrapped in a group
                            unreadable = exc
                finally:
                    done.put_nowait(None)  # after every answer: the TaskGroup waited for them
                if unreadable is not None:
                    raise unreadable

            reader = asyncio.create_task(read())
            try:
                while (response := await done.get()) is not None:
                    yield response
                    slots.release()
                await reader  # re-raises a failure of the request stream
            finally:
                # Client gone, deadline, or server stopping: cancel the items still in the
                # core so their batch slots are freed.
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _stream_item(
        self, request: pb.StreamRequest, deadline: float | None
    ) -> pb.StreamResponse:
        try:
            predictions = await self._core.classify(
                request.image, top_k=_top_k(request.top_k), deadline=deadline
            )
        except Exception as exc:  # one bad item must not end the stream
            return pb.StreamResponse(id=request.id, error=_error(exc))
        return pb.StreamResponse(id=request.id, predictions=_predictions(predictions))

    async def GetModel(
        self,
        request: pb.GetModelRequest,
        context: grpc.aio.ServicerContext[pb.GetModelRequest, pb.ModelInfo],
    ) -> pb.ModelInfo:
        async with _Rpc(self._metrics, "GetModel", context):
            return self._model


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """The gRPC server of the process: Classifier + Health + reflection, on the app's loop.

    The FastAPI lifespan owns it: start() after the core, set_serving() to follow readiness,
    stop(grace) before draining the core.
    """

    def __init__(
        self,
        classifier: Core,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        max_image_bytes: int,
        max_batch_images: int | None = None,
        default_timeout: float | None = None,
        max_concurrent_rpcs: int | None = None,
    ) -> None:
        """max_batch_images: most images per ClassifyBatch (None: no limit of its own);
        default_timeout: seconds allowed to a call or stream item without a gRPC deadline;
        max_concurrent_rpcs: beyond it gRPC answers RESOURCE_EXHAUSTED itself, before the
        handler runs, so a flood cannot make the server hold thousands of received images."""
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._core, self._metrics = classifier, metrics
        self._service = ClassifierService(
            classifier, metrics, max_batch_images=max_batch_images, default_timeout=default_timeout
        )
        self._health = health_aio.HealthServicer()
        self._address = _address(host, port)
        # Same limits as REST: an image may have max_image_bytes (the core checks each one),
        # a ClassifyBatch message max_batch_images of them.
        self._options = server_options(max_image_bytes * (max_batch_images or 1) + MESSAGE_MARGIN)
        self._server: grpc.aio.Server | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Binds, starts serving (health NOT_SERVING) and returns the bound port."""
        server = grpc.aio.server(
            options=self._options,
            maximum_concurrent_rpcs=self._max_concurrent_rpcs,
            interceptors=[Admission(self._core, self._metrics), StrictParsing(self._metrics)],
        )
        pb_grpc.add_ClassifierServicer_to_server(self._service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_name, reflection.SERVICE_NAME), server
        )
        # The stock servicer starts with "" SERVING; nothing is served until warm-up is done.
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            port = server.add_insecure_port(self._address)
        except RuntimeError as exc:  # grpcio raises on a failed bind (older ones returned 0)
            raise RuntimeError(f"gRPC cannot listen on {self._address}: {exc}") from exc
        if port == 0:
            raise RuntimeError(f"gRPC cannot listen on {self._address}")
        await server.start()
        self._server = server
        logger.info("gRPC listening on %s (port %d)", self._address, port)
        return port

    def set_serving(self, serving: bool) -> None:
        """Health of "" and mnv3.v1.Classifier: SERVING after warm-up, NOT_SERVING when draining.

        Call it on the server's event loop. The stock asyncio servicer's setter is a coroutine
        (it wakes Watch streams), so it is scheduled; tasks run in call order, the last wins.
        """
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        loop = asyncio.get_running_loop()
        for name in ("", SERVICE_NAME):
            task = loop.create_task(self._health.set(name, status))
            self._health_updates.add(task)  # keep a reference until it ran
            task.add_done_callback(self._health_updates.discard)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING for good, refuse new calls, give running ones `grace` seconds."""
        if self._server is None:
            return
        await asyncio.gather(*self._health_updates)
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._server = None
        logger.info("gRPC server stopped")
